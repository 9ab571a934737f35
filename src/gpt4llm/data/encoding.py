"""Text to token ids and ids to padded tensors, the one way the prompt formats (data.formats), the pair data and
scoring do it."""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100  # the label of a token that is not trained on: torch's cross-entropy default ignore_index


def encode_truncated(
    tokenizer, texts: list[str], max_length: int, add_special_tokens: bool = True
) -> tuple[list[list[int]], list[int]]:
    """Each text's ids, cut at `max_length` by the tokenizer's own truncation (what stanford_alpaca did for every
    record), and each text's untruncated length. Untruncated first, so reports know true lengths; only the few over
    the limit are tokenized again. `add_special_tokens=False` for text a chat template rendered (it writes its own)."""
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    lengths = [len(x) for x in ids]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        for i, cut in zip(
            too_long,
            tokenizer(
                [texts[i] for i in too_long],
                max_length=max_length,
                truncation=True,
                add_special_tokens=add_special_tokens,
            )["input_ids"],
        ):
            ids[i] = cut
    return ids, lengths


def pad_right(
    sequences: list[list[int]], pad_value: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences right-padded with `pad_value` to `length` (default: the longest), and the attention mask, built
    from the lengths, not from `ids != pad`: a pad token that is also EOS never hides the real EOS."""
    length = length or max(len(s) for s in sequences)
    padded = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, values in enumerate(sequences):
        padded[row, : len(values)] = torch.as_tensor(values)
        mask[row, : len(values)] = 1
    return padded, mask


def padded_batch(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A model's inputs for `sequences`: right-padded input_ids and their attention mask."""
    input_ids, attention_mask = pad_right(sequences, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PairSide(NamedTuple):
    """One side of a batch of comparisons (or of responses to score): each prompt + response's ids, at most
    `max_length` long; each untruncated length; how many of each sequence's first ids are the prompt; whether the
    prompt's start was cut to keep room for the response (keep_the_answer)."""

    ids: list[list[int]]
    lengths: list[int]
    prompt_tokens: list[int]
    prompt_cut: list[bool]


def keep_the_answer(whole: list[int], prompt_tokens: int, max_length: int, bos_id: int | None) -> tuple[list[int], int]:
    """A prompt + response sequence cut to `max_length`, as TRL's preference trainers cut one: a prompt of more than
    half of `max_length` loses its start (a leading BOS kept) down to half, then the end is cut. Right truncation alone
    would leave a long prompt's two answers cut away (two identical sequences, which teach nothing). Returns the ids
    and how many of them are the prompt."""
    if len(whole) <= max_length or prompt_tokens <= max_length // 2:
        return whole[:max_length], min(prompt_tokens, max_length)
    keep = 1 if bos_id is not None and whole and whole[0] == bos_id else 0
    cut = prompt_tokens - max_length // 2
    return (whole[:keep] + whole[keep + cut :])[:max_length], prompt_tokens - cut


def encode_with_prompt(
    tokenizer, texts: list[str], prompt_tokens: list[int], max_length: int, add_special_tokens: bool = True
) -> PairSide:
    """Each `prompt + response` text's ids, right-truncated at `max_length` by the tokenizer (as `encode_truncated`),
    except where the prompt (`prompt_tokens`: its untruncated length) would leave no room for the answer: there
    `keep_the_answer` cuts the prompt's start."""
    ids, lengths = encode_truncated(tokenizer, texts, max_length, add_special_tokens)
    kept = [min(n, len(x)) for n, x in zip(prompt_tokens, ids)]
    long = [i for i, (n, p) in enumerate(zip(lengths, prompt_tokens)) if n > max_length and p > max_length // 2]
    if long:
        wholes = tokenizer([texts[i] for i in long], add_special_tokens=add_special_tokens)["input_ids"]
        for i, whole in zip(long, wholes):
            ids[i], kept[i] = keep_the_answer(whole, prompt_tokens[i], max_length, tokenizer.bos_token_id)
    cut = set(long)
    return PairSide(ids, lengths, kept, [i in cut for i in range(len(ids))])
