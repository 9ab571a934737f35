"""`engine=vllm`: the requests and completions of models.engine, run by vLLM on a CUDA GPU (extra `gpt4llm[vllm]`),
for `generate`, `evaluate`'s answers and `bestofn`.

vLLM loads the export the way its users load it: the merged model directory, or an adapter directory (export/adapter)
as the base it names plus the adapter through vLLM's LoRA support (`enable_lora`, a `LoRARequest`). The prompts are
our token ids (`TokensPrompt`: tokenized as training tokenized them, BOS included where the format has one), each
request with its own `SamplingParams` (greedy as temperature 0; a sampled request with its own seed, so a rerun or a
resumed `generate` draws the same answer from vLLM again), the stop ids and stop strings of the HF engine. The answer's
text is decoded by our tokenizer from the token ids vLLM returns, as the HF engine decodes it.

What differs from the HF engine, by design: vLLM samples with its own kernels, so a sampled answer under one engine
is not the other's (greedy answers agree where the logits do: bench/vllm_check.py measures how often on a GPU); and
it does not stream here (serve and online RL run the HF engine).

Written against vLLM 0.34's API; it has not run on a GPU in this project yet (no GPU was lent): the README says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from gpt4llm.errors import ConfigError, LaunchError, TooFewSucceeded
from gpt4llm.models.engine import EOS, LENGTH, STOP, Completion, Request, admit

log = logging.getLogger(__name__)

CHOICES = ("hf", "vllm")
EXTRA = "pip install 'gpt4llm[vllm]'"
CHUNK = 4  # requests handed to vLLM at once, in units of max_rows: answers reach the file as each chunk ends


def check_engine(engine: str, device: str | None = None) -> None:
    """An unknown engine, or vllm where it cannot run (no CUDA GPU, a CPU device asked for, vLLM not installed): one
    line, before any model is loaded."""
    if engine not in CHOICES:
        raise ConfigError(f"engine={engine!r}: choose hf (transformers, any device) or vllm (vLLM, a CUDA GPU)")
    if engine != "vllm":
        return
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        where = f"model.device={device}" if device is not None else "no CUDA GPU here"
        raise LaunchError(f"engine=vllm runs vLLM on a CUDA GPU ({EXTRA}), and {where}: use engine=hf")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"engine=vllm needs vLLM: {EXTRA}, or use engine=hf")


class VLLMModel:
    """What the generating commands need of a model, loaded by vLLM: its config (the training record that names its
    prompt format), its generation config (the ids it stops at), and the `vllm.LLM` with the adapter, if any."""

    def __init__(self, path: str, tokenizer, dtype: str | None = None, seed: int = 0) -> None:
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        from gpt4llm.models.hf import adapter_base, check_model_dir

        check_model_dir(path)
        base = adapter_base(path)
        self.config = AutoConfig.from_pretrained(base or path)
        self.lora = None
        extra = {}
        if base:
            rank = lora_rank(path, tokenizer, self.config)
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(Path(path).resolve()))
            extra = {"enable_lora": True, "max_lora_rank": rank}
        try:
            self.generation_config = GenerationConfig.from_pretrained(base or path)
        except OSError:  # a model directory without generation_config.json
            self.generation_config = None
        self.llm = LLM(model=str(base or path), tokenizer=path, dtype=dtype or "auto", seed=seed, **extra)
        # vLLM's own limit (the config's positions, or less: the tokenizer's model_max_length, a sliding window); a
        # prompt at it would fail its whole batch there, so the engine answers it prompt_too_long first
        self.context = self.llm.model_config.max_model_len

    def close(self) -> None:
        """Frees the GPU for what runs next in the process (best-of-N's reward model): vLLM's engine core is a process
        of its own, which holds the memory until it ends (0.34 has no public shutdown; this is what its finalizer
        calls)."""
        import gc

        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()


def is_vllm(model) -> bool:
    return isinstance(model, VLLMModel)


def lora_rank(path: str, tokenizer, base_config) -> int:
    """The adapter's rank, for vLLM's `max_lora_rank`. What vLLM's LoRA cannot serve stops here, before anything
    loads, with the merged export named instead: rows of tokens the run added (LLaMA's pad, a template's end of
    turn; vLLM loads no embedding rows), DoRA, trained biases, a rank above vLLM's largest."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    vocab = getattr(base_config, "vocab_size", None)
    rank = max([int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    unsupported = [
        what
        for what, present in (
            (
                f"trains the rows of tokens the run added to {base}'s vocabulary",
                config.get("trainable_token_indices") or (vocab and len(tokenizer) > vocab),
            ),
            ("is DoRA (peft.use_dora)", config.get("use_dora")),
            (f"trains biases (bias={config.get('bias')})", config.get("bias", "none") != "none"),
            (f"has rank {rank}, above vLLM's largest (512)", rank > 512),
        )
        if present
    ]
    if unsupported:
        raise ConfigError(
            f"{path}: this adapter {' and '.join(unsupported)}, which vLLM's LoRA does not serve; give engine=vllm "
            f"the merged export ({Path(path).parent}) instead"
        )
    # vLLM takes one of these (its MaxLoRARanks): the smallest that holds the adapter's rank
    return next(allowed for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512) if allowed >= rank)


def refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises for settings it refuses: VLLMValidationError (not a ValueError) where it has one."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMValidationError)


class VLLMEngine:
    """models.engine.Engine's `run`, through vLLM (see the module docstring)."""

    def __init__(self, model: VLLMModel, tokenizer, stop_ids: list[int], max_rows: int = 16) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
        self.max_rows = max(1, max_rows)
        self.context = model.context
        top_k = getattr(model.generation_config, "top_k", None)
        self.default_top_k = 50 if top_k is None else top_k  # transformers' generate's default, as the HF engine

    def run(
        self,
        requests: list[Request],
        on_token: Callable | None = None,
        cancelled: Callable | None = None,
        more: Callable | None = None,
    ) -> Iterator[tuple[int, Completion]]:
        """Yields (index into `requests`, its completion), a chunk of requests at a time."""
        if on_token is not None or cancelled is not None or more is not None:
            raise ConfigError("engine=vllm does not stream here: serve runs engine=hf")
        from vllm.inputs import TokensPrompt

        runnable, refused = admit(requests, 0, self.context)
        yield from refused
        runnable.reverse()  # longest first, as the HF engine
        size = self.max_rows * CHUNK
        for start in range(0, len(runnable), size):
            chunk = runnable[start : start + size]
            outputs = self.model.llm.generate(
                [TokensPrompt(prompt_token_ids=list(requests[i].ids)) for i in chunk],
                [self.sampling_params(requests[i]) for i in chunk],
                use_tqdm=False,
                lora_request=self.model.lora,
            )
            for i, output in zip(chunk, outputs):
                yield i, self.completion(requests[i], output.outputs[0])

    def sampling_params(self, request: Request):
        """vLLM's SamplingParams for `request`: its length (within the context), stops and sampling settings."""
        from vllm import SamplingParams

        limit = request.max_new_tokens
        if self.context:
            limit = min(limit, self.context - len(request.ids))
        settings = {"temperature": 0.0}  # vLLM's greedy
        if request.sampling is not None:
            sampling = request.sampling
            top_k = sampling.top_k if sampling.top_k is not None else self.default_top_k
            settings = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": top_k or 0,  # vLLM's 0: no top-k
                "seed": request.seed,
            }
        try:
            return SamplingParams(
                max_tokens=limit,
                stop=[s for s in request.stop if s] or None,  # vLLM refuses an empty one; the HF engine skips it
                stop_token_ids=self.stop_ids,
                skip_special_tokens=True,
                **settings,
            )
        except refusals() as err:  # vLLM's own bounds (temperature above 2, top_p of 0): said as a setting
            raise ConfigError(f"engine=vllm refuses these decoding settings: {err}") from None

    def completion(self, request: Request, output) -> Completion:
        """A vLLM CompletionOutput as the HF engine's Completion: the stop id taken off the tokens, the text decoded by
        our tokenizer and cut before the first stop string."""
        tokens = list(output.token_ids)
        if output.finish_reason not in ("stop", "length"):  # abort, error: not an answer to write down
            raise TooFewSucceeded(
                f"vLLM ended a request with finish_reason {output.finish_reason!r}; run the same command again (the "
                "answers already written are kept)"
            )
        if output.finish_reason == "length":
            return Completion(self._text(tokens), len(tokens), LENGTH, tuple(tokens))
        if isinstance(output.stop_reason, str):  # a stop string: vLLM's tokens end at the one that completed it
            text = self._text(tokens)
            cuts = [text.find(s) for s in request.stop if s and s in text]
            return Completion(text[: min(cuts)] if cuts else text, len(tokens), STOP, tuple(tokens))
        # a stop id: stop_reason names it (None: the tokenizer's EOS); vLLM keeps it as the last token
        stop_id = output.stop_reason if output.stop_reason is not None else self.tokenizer.eos_token_id
        if tokens and tokens[-1] in self.stop_ids:
            stop_id = tokens.pop()
        return Completion(self._text(tokens), len(tokens), EOS, tuple(tokens), stop_id)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
