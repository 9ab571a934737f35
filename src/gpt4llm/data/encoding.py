"""Text to token ids and ids to padded tensors, the one way the prompt formats (data.formats), the pair data and
scoring do it."""

from __future__ import annotations

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


def encode_responses(
    tokenizer, prompts: list[str], responses: list[str], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids of `prompt + response + EOS` (what a reward model scores), right-truncated at `max_length`, and each
    untruncated length."""
    return encode_truncated(tokenizer, [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)], max_length)
