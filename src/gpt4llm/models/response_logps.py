"""A causal LM's log-probability of each response in a batch: the sum over the response's tokens (the prompt's are
labelled -100), on padded batches (a row a sequence) or packed ones (one row; `sequence_lengths`).

The output layer runs only on the positions that predict a response token, TOKEN_CHUNK of them at a time, each chunk
recomputed in backward (activation checkpointing) rather than kept: a batch's vocabulary-wide logits never exist at
once, only one chunk's. This is what keeps DPO's memory at or under TRL's, whose trainer fuses its LM head the same
way; the result is the model's own logits' (`fused=False`, the plain forward, gives the same numbers and is what
models whose logits are more than the output layer's product fall back to).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from gpt4llm.data.encoding import IGNORE_INDEX

TOKEN_CHUNK = 1024  # x the vocabulary: 125 MiB of fp32 logits a chunk for LLaMA's 32000, 490 MiB for LLaMA 3's
# config keys by which some architectures transform the output layer's product (Gemma 2's soft cap, Cohere's scale,
# Granite's divisor, ...): their log-probabilities come from the model's own logits
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def response_logps(model, batch: dict[str, torch.Tensor], fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its labelled tokens (fp32) and how many those were. `model`: a causal
    LM, peft-wrapped or not; `batch`: input_ids, labels, and attention_mask (padded) or position_ids and
    sequence_lengths (packed)."""
    token_logps, _, rows, positions = labelled_token_logps(model, batch, fused)
    labels, lengths = batch["labels"], batch.get("sequence_lengths")
    if lengths is None:
        owner, count = rows, len(labels)
    else:  # one packed row: a position (predicting the next token) belongs to the sequence it stands in
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=labels.device), lengths.to(labels.device))
        owner, count = owner[positions], len(lengths)
    sums = torch.zeros(count, device=labels.device).index_add_(0, owner, token_logps)
    return sums, torch.bincount(owner, minlength=count)


def labelled_token_logps(
    model, batch: dict[str, torch.Tensor], fused: bool = True, entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The log-probability (fp32) of each labelled token, with the (row, position) that predicts it, and with
    `entropy` the entropy of the model's distribution there (no gradient: a metric); the chunked output layer of the
    module docstring, or the model's own logits (`fused=False`, or a model that transforms them). `temperature`: of
    the distribution the tokens were sampled from (online RL), the logits divided by it, as TRL does."""
    targets, rows, positions, inputs = supervised_positions(batch)
    if fused and not logit_transforms(model):
        picked_targets = targets[rows, positions]
        token_logps, entropies = as_forward(
            model, _fused_logps, model, inputs, picked_targets, rows, positions, entropy, temperature
        )
    else:
        keep = positions.unique()  # the output layer only where some row predicts a response token
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        picked_logits = logits[rows, torch.searchsorted(keep, positions)]
        token_logps = _target_logps(None, picked_logits, targets[rows, positions], temperature)
        entropies = None
        if entropy:
            with torch.no_grad():
                entropies = _entropy(picked_logits, temperature)
    return token_logps, entropies, rows, positions


def supervised_positions(batch: dict[str, torch.Tensor]):
    """The next-token targets, the (row, position) pairs that predict a response token, and the model's inputs."""
    targets = batch["labels"][:, 1:]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    inputs = {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids")}
    return targets, rows, positions, inputs


def final_hidden(model, inputs, rows, positions) -> torch.Tensor:
    """The decoder's last hidden state at those positions: what the output layer makes their logits from."""
    return model.get_decoder()(**inputs, use_cache=False).last_hidden_state[rows, positions]


def logit_transforms(model) -> list[str]:
    """The config keys by which the model transforms its output layer's product (LOGIT_TRANSFORMS) that it sets."""
    return [key for key in LOGIT_TRANSFORMS if getattr(model.config, key, None) is not None]


def _fused_logps(model, inputs, targets, rows, positions, entropy: bool, temperature: float):
    hidden = final_hidden(model, inputs, rows, positions)
    head = model.get_output_embeddings()
    chunks = list(zip(hidden.split(TOKEN_CHUNK), targets.split(TOKEN_CHUNK)))
    if torch.is_grad_enabled():
        picked = [checkpoint(_target_logps, head, h, t, temperature, use_reentrant=False) for h, t in chunks]
    else:  # the reference: nothing is kept for backward anyway
        picked = [_target_logps(head, h, t, temperature) for h, t in chunks]
    token_logps = torch.cat(picked) if picked else hidden.new_zeros(0, dtype=torch.float32)
    entropies = None
    if entropy:
        with torch.no_grad():
            parts = [_entropy(head(h), temperature) for h, _ in chunks]
        entropies = torch.cat(parts) if parts else token_logps.new_zeros(0)
    return token_logps, entropies


def as_forward(model, fn, *args):
    """`fn(*args)` run in place of `model`'s forward, through its `__call__` and so its hooks: an FSDP2-sharded model
    gathers its root's own weights (embeddings, final norm, output layer) in those hooks only, and a computation
    that calls its parts one by one (the decoder, then the output layer in chunks) needs them gathered. A model
    without such hooks runs `fn` directly."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return fn(*args)
    own = vars(model).get("forward")  # an instance's own forward (a library's patch), put back afterwards

    def restore() -> None:
        if own is None:
            vars(model).pop("forward", None)
        else:
            model.forward = own

    def redirected(*inner):
        restore()  # inside the hooks already: a call of `model` within `fn` runs its real forward
        return fn(*inner)

    model.forward = redirected  # the instance's attribute, for this call: __call__ runs the hooks around it
    try:
        return model(*args)
    finally:
        restore()


def _entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logps.exp() * logps).sum(-1)


def _target_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) at each position: its logit less the logsumexp of the position's logits (no log-softmax over the
    vocabulary kept), in fp32. `hidden` are the final hidden states (then `head` makes the logits) or the logits."""
    logits = (hidden if head is None else head(hidden)).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
