"""The generation engine behind generate, evaluate, bestofn and serve: continuous batching over transformers' own KV
cache (DynamicCache), with per-request limits, stops and seeds.

- Requests run longest prompt first, at most `max_rows` sequences at once. A sequence that ends (a stop id, a stop
  string, its max_new_tokens) leaves the batch at once, its cache rows dropped; waiting requests are prefilled and
  join the running batch, their cache merged in (left-padded to a common length, the pads masked), so no row waits
  for the longest answer of a static batch and the cache of what runs is kept.
- Each request has its own max_new_tokens, stop strings and sampling settings, and samples with its own seeded
  generator, so a rerun, or a resumed `generate` that batches the remaining requests differently, draws the same
  random numbers for it. Its answers are then the same where its logits are (tested on CPU in fp32); on a GPU, in
  bf16, another batch can change their low-order bits and so, rarely, a token.
- Under several ranks (validation in a DDP, ZeRO or FSDP run) every rank runs as many forward passes as the busiest,
  and the same batch size, as transformers' synced_gpus does.

Why not transformers' own: `generate` batches statically (a batch ends when its longest answer does, and a finished
row keeps computing pads) and seeds one generator for the whole batch; its continuous batching (`generate_batch`,
paged attention) has neither per-request seeds nor stop strings, and on a CPU it was slower than this
(bench/generation_speed.py). What this file writes is only the loop: the model, its cache, and the logits warpers
(temperature, top-k, top-p) are transformers'.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gpt4llm.errors import ConfigError

log = logging.getLogger(__name__)

LENGTH, EOS, STOP, TOO_LONG = "length", "eos", "stop", "prompt_too_long"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None: the model's generation config (50 by default, as transformers' generate)


@dataclass(frozen=True)
class Request:
    ids: tuple[int, ...]  # the prompt's token ids
    max_new_tokens: int
    sampling: Sampling | None = None  # None: greedy
    seed: int = 0  # the generator this request samples with
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first of them


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens (a stop id not counted; at a stop string, up to the one that completed it)
    # "eos": a stop id ended it; "stop": a stop string did; "length": max_new_tokens or the context cut it;
    # "prompt_too_long": the prompt leaves no room in the model's context, nothing was generated
    finish_reason: str
    token_ids: tuple[int, ...] = ()  # the generated ids, the stop id not among them
    stop_id: int | None = None  # the stop id that ended it ("eos"): what a policy trained on it learns to end with


class _Row:
    """A running sequence: its request, what it generated, the token to feed next."""

    def __init__(self, index: int, request: Request, limit: int, device) -> None:
        self.index, self.request, self.limit = index, request, limit
        self.tokens: list[int] = []
        self.dead = False  # ended, but kept in a batch whose cache cannot drop rows
        self.generator = None
        if request.sampling is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)


class Engine:
    """Runs requests on a causal LM (see the module docstring). `stop_ids`: the ids that end a sequence (EOS and a
    chat template's end of turn); `max_rows`: sequences decoded at once (the memory a batch of KV cache takes)."""

    def __init__(self, model, tokenizer, stop_ids: list[int], max_rows: int = 16, join_at: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = set(stop_ids)
        self.max_rows = max(1, max_rows)
        # waiting requests join a running batch once this many rows are free: each join is a forward pass of its own
        self.join_at = join_at or max(1, self.max_rows // 4)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = pad if pad is not None else 0  # what padding holds does not matter: the mask hides it
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # transformers' generate samples from the 50 likeliest tokens unless the model's generation config says
        top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
        self.default_top_k = 50 if top_k is None else top_k
        # a peft model's forward takes **kwargs and hands them to its base model: the base's signature tells
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        parameters = inspect.signature(base.forward).parameters
        self.logits_to_keep = "logits_to_keep" in parameters
        self.warned = False
        # called on the model once it is in eval mode: a QLoRA policy that trains on keeps its 4-bit layers on the
        # training kernel (models.base_module.keep_4bit_training_kernels), which eval mode would repack for good
        self.after_eval: Callable | None = None
        self.kv_per_token = kv_bytes_per_token(model)  # for the memory plan
        # transformers 5.x renames past_key_values to cache; the cache object is updated in place either way
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @torch.no_grad()  # not inference_mode: FSDP's parameters cannot be used under it (pytorch#95957)
    def run(
        self,
        requests: list[Request],
        on_token: Callable[[int, int], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        more: Callable[[int], list[Request]] | None = None,
    ) -> Iterator[tuple[int, Completion]]:
        """Yields (index into `requests`, its completion) as each one ends. `on_token(index, token_id)` sees every
        generated token (a stream); a request for which `cancelled(index)` turns true ends at its next token.
        `more(free)`, asked whenever nothing waits and `free` rows could join, gives requests that arrived meanwhile
        (a server's queue); they are numbered on from the last, and the run ends when it gives none."""
        was_training = self.model.training
        self.model.eval()
        if self.after_eval is not None:
            self.after_eval(self.model)
        try:
            yield from self._run(list(requests), on_token, cancelled or (lambda i: False), more)
        finally:
            self.model.train(was_training)

    def _run(self, requests, on_token, cancelled, more) -> Iterator[tuple[int, Completion]]:
        waiting, refused = admit(requests, 0, self.context)
        yield from refused
        synced = world_size() > 1
        max_rows, budget = self._plan([requests[i] for i in waiting], synced)
        join_at = min(self.join_at, max_rows)
        # With a cache whose rows cannot be dropped (sliding-window or recurrent layers), an ended row stays in the
        # batch, fed padding, until the whole batch has ended: static batching for those models.
        rows: list[_Row] = []
        cache = mask = None
        while True:
            live = [r for r in rows if not r.dead]
            free = max_rows - len(rows)
            can_join = not rows or (free >= join_at and mergeable(cache))
            if not waiting and more is not None and can_join:
                first = len(requests)
                requests += more(free)
                waiting, refused = admit(requests, first, self.context)
                yield from refused
            busy = bool(waiting or live)
            if not (all_ranks_any(busy, self.model.device) if synced else busy):
                break
            if not busy:
                # Another rank still generates: under ZeRO-3 or FSDP each forward gathers every layer's weights from
                # all ranks, so this one runs a forward of its own for each of theirs (transformers' synced_gpus).
                self.model(input_ids=torch.tensor([[self.pad]], device=self.model.device), use_cache=False)
                continue
            joining = self._joining(requests, waiting, rows, free, budget) if waiting and can_join else []
            if joining:
                new = []
                for i in joining:
                    room = self.context - len(requests[i].ids) if self.context else requests[i].max_new_tokens
                    limit = min(requests[i].max_new_tokens, room)
                    new.append(_Row(i, requests[i], limit, self.model.device))
                new_cache, new_mask, logits = self._prefill([r.request.ids for r in new])
                rows, cache, mask = rows + new, *merge(cache, mask, new_cache, new_mask)
                chosen = list(zip(new, self._choose(new, logits)))
            else:
                last = [[self.pad if r.dead else r.tokens[-1]] for r in rows]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                out = self.model(
                    input_ids=torch.tensor(last, device=self.model.device),
                    attention_mask=mask,
                    position_ids=(mask.sum(dim=1, keepdim=True) - 1),
                    use_cache=True,
                    **{self.cache_arg: cache},
                )
                chosen = [(r, t) for r, t in zip(rows, self._choose(rows, out.logits[:, -1, :])) if not r.dead]
            ended = set()
            for row, token in chosen:
                done = self._append(row, token, on_token, cancelled)
                if done is not None:
                    ended.add(id(row))
                    yield row.index, done
            if ended:
                for row in rows:
                    row.dead = row.dead or id(row) in ended
                keep = [k for k, r in enumerate(rows) if not r.dead]
                if not keep:
                    rows, cache, mask = [], None, None
                elif mergeable(cache):
                    rows = [rows[k] for k in keep]
                    cache, mask = select(cache, mask, keep)

    def rows_that_fit(self, requests: list[Request], synced: bool = False) -> int:
        """max_rows, or fewer when the KV cache of max_rows of the longest of `requests` would not fit in the memory
        free on the model's device (said once; a single row that does not fit is an error before anything runs).
        `synced`: the fewest over all ranks, which must run the same batches."""
        return self._plan(requests, synced)[0]

    def _plan(self, requests: list[Request], synced: bool) -> tuple[int, int | None]:
        """(rows_that_fit, the bytes the running rows' KV cache and logits may take; None: not planned)."""
        if not self.kv_per_token:
            return self.max_rows, None
        free = free_memory(self.model.device)
        budget = int(free * MEMORY_SHARE)
        if synced:
            budget = all_ranks_min(budget, self.model.device)
        if not requests:  # a server's run starts empty: its requests are checked as they join
            return self.max_rows, budget
        longest = max(self._span(r) for r in requests)
        per_row = self._row_bytes(longest)
        fit = budget // per_row
        if fit >= self.max_rows:
            return self.max_rows, budget
        need = f"{per_row / 2**20:.0f} MiB of KV cache per sequence of {longest} tokens, {free / 2**30:.1f} GiB free"
        if fit < 1:
            raise ConfigError(f"generation does not fit in memory: {need}; lower max_new_tokens or the prompts' length")
        if not self.warned:
            log.warning(f"generating {fit} sequences at a time instead of {self.max_rows}: {need}")
            self.warned = True
        return fit, budget

    def _span(self, request: Request) -> int:
        """The most tokens `request` can hold in the cache: its prompt and its answer, within the context."""
        span = len(request.ids) + request.max_new_tokens
        return min(span, self.context) if self.context else span

    def _row_bytes(self, length: int) -> int:
        """What one row of `length` tokens takes: its keys and values, and one step's logits."""
        return self.kv_per_token * length + 4 * (getattr(self.model.config, "vocab_size", None) or 0)

    def _joining(self, requests, waiting: list[int], rows: list[_Row], free: int, budget: int | None) -> list[int]:
        """The waiting requests that join now, longest first: up to `free` rows, and, when the memory is planned, only
        while the KV cache of every row at the longest span among them fits in `budget` (requests arriving while
        others run, as serve's, are checked here; one request joins an empty batch whatever it needs)."""
        joining: list[int] = []
        longest = max((self._span(r.request) for r in rows), default=0)
        for i in reversed(waiting):  # the longest prompt first (waiting is popped from its end)
            if len(joining) == free:
                break
            longest = max(longest, self._span(requests[i]))
            count = len(rows) + len(joining) + 1
            if budget is not None and count > 1 and count * self._row_bytes(longest) > budget:
                break
            joining.append(i)
        del waiting[len(waiting) - len(joining) :]
        return joining

    def _prefill(self, prompts: list[tuple[int, ...]]):
        from transformers import DynamicCache

        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        cache = DynamicCache(config=self.model.config)
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
            **{self.cache_arg: cache},
            **extra,
        )
        return cache, mask, out.logits[:, -1, :].clone()  # not a view keeping every position's logits alive

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row: the argmax for greedy rows; for sampling ones, a draw by inverse CDF with one
        uniform number from the row's own generator (rows with the same settings warped together)."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1).tolist()
        groups: dict[Sampling, list[int]] = {}
        for k, row in enumerate(rows):
            if row.generator is not None:
                groups.setdefault(row.request.sampling, []).append(k)
        for sampling, ks in groups.items():
            probs = torch.softmax(self._warp(sampling, logits[ks]), dim=-1)
            uniform = torch.cat([torch.rand(1, generator=rows[k].generator, device=probs.device) for k in ks])
            cdf = probs.cumsum(dim=-1)
            # the first token whose cumulative probability exceeds u (right=True: never one of probability 0)
            drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            for k, token in zip(ks, drawn.clamp(max=probs.shape[-1] - 1).tolist()):
                tokens[k] = token
        return tokens

    def _warp(self, sampling: Sampling, scores: torch.Tensor) -> torch.Tensor:
        # transformers' own warpers, in generate's order: temperature, top-k, top-p
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        top_k = sampling.top_k if sampling.top_k is not None else self.default_top_k
        if sampling.temperature != 1.0:
            scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if sampling.top_p < 1.0:
            scores = TopPLogitsWarper(sampling.top_p)(None, scores)
        return scores

    def _append(self, row: _Row, token: int, on_token, cancelled) -> Completion | None:
        """Adds `token` to `row`; its completion when that ended it."""
        if token in self.stop_ids:
            return self._completion(row, EOS, token)
        row.tokens.append(token)
        if on_token is not None:
            on_token(row.index, token)
        if row.request.stop:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cuts = [text.find(s) for s in row.request.stop if s and s in text]
            if cuts:
                return Completion(text[: min(cuts)], len(row.tokens), STOP, tuple(row.tokens))
        if len(row.tokens) >= row.limit or cancelled(row.index):
            return self._completion(row, LENGTH)
        return None

    def _completion(self, row: _Row, reason: str, stop_id: int | None = None) -> Completion:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return Completion(text, len(row.tokens), reason, tuple(row.tokens), stop_id)


def admit(requests: list[Request], first: int, context: int | None) -> tuple[list[int], list[tuple[int, Completion]]]:
    """The requests from `first` on that can run, shortest prompt to longest (the engine pops the longest first, so a
    batch that does not fit fails at once), and the completions of those that cannot: an empty prompt, no new tokens,
    or a prompt that leaves no room in the model's `context`."""
    runnable, refused = [], []
    for i in range(first, len(requests)):
        request = requests[i]
        if not request.ids or (context and len(request.ids) >= context):
            refused.append((i, Completion("", 0, TOO_LONG if request.ids else LENGTH)))
        elif request.max_new_tokens <= 0:
            refused.append((i, Completion("", 0, LENGTH)))
        else:
            runnable.append(i)
    runnable.sort(key=lambda i: len(requests[i].ids))
    return runnable, refused


# --- memory --------------------------------------------------------------------------------------------------------
MEMORY_SHARE = 0.8  # of the free memory, what the KV cache may take (the rest: activations, the allocator's slack)


def kv_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take in the cache, over all layers (0 where the config does not say: a
    model of another shape is not planned for)."""
    config = getattr(model.config, "text_config", None) or model.config
    try:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = config.num_hidden_layers
    except AttributeError:
        return 0
    dtype = getattr(model, "dtype", torch.float32)  # the first floating-point weight's (not a 4-bit one's)
    dtype = dtype if dtype.is_floating_point else torch.float32
    return 2 * layers * heads * head_dim * torch.finfo(dtype).bits // 8


def free_memory(device) -> int:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the system's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        # what the driver has free, and what torch's allocator holds but no tensor uses (free to it, not the driver)
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40  # unknown (not Linux): no limit from here


# --- ranks ---------------------------------------------------------------------------------------------------------
def world_size() -> int:
    """Processes generating together (a validation under DDP, ZeRO or FSDP), 1 outside a distributed run."""
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def all_ranks_any(flag: bool, device) -> bool:
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def all_ranks_min(number: int, device) -> int:
    value = torch.tensor([number], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return int(value.item())


# --- the cache of the running rows --------------------------------------------------------------------------------
def mergeable(cache) -> bool:
    """Whether rows can join and leave `cache`: every layer a plain DynamicLayer (a sliding-window or recurrent layer
    keeps other state; such models run one batch at a time, ended rows kept in it until all have ended)."""
    from transformers.cache_utils import DynamicLayer

    return cache is None or all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def merge(cache, mask, new_cache, new_mask):
    """The running rows' cache and mask with the new rows' appended, both left-padded (masked) to one length."""
    if cache is None:
        return new_cache, new_mask
    length = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, length), _pad_left(new.keys, length)])
        layer.values = torch.cat([_pad_left(layer.values, length), _pad_left(new.values, length)])
    mask = torch.cat([_pad_left(mask, length, dim=1), _pad_left(new_mask, length, dim=1)])
    return cache, mask


def select(cache, mask, keep: list[int]):
    """The cache and mask of the rows `keep`, without the leading columns that are padding in all of them."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask[index]
    start = int((mask.sum(dim=0) > 0).nonzero()[0])
    cache.batch_select_indices(index)
    if start:  # only called on caches whose rows can leave (mergeable)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        mask = mask[:, start:]
    return cache, mask


def _pad_left(x: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
