"""engine=vllm (models.vllm_engine). vLLM runs on CUDA GPUs only, so here: the one-line refusals (no GPU, no vLLM,
an unknown engine, a CPU device, an adapter with new tokens' rows), from the command line as users meet them; and,
where vLLM is importable, our requests turned into vLLM's own SamplingParams and vLLM's own CompletionOutputs turned
into our completions. Greedy answers against the HF engine, and the speed: bench/vllm_check.py on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt4llm.errors import ConfigError, LaunchError, TooFewSucceeded
from gpt4llm.models import vllm_engine
from gpt4llm.models.engine import EOS, LENGTH, STOP, TOO_LONG, Request, Sampling
from gpt4llm.models.vllm_engine import VLLMEngine, VLLMModel, check_engine


def test_unknown_engine_is_one_line():
    with pytest.raises(ConfigError, match=r"engine='tgi': choose hf .* or vllm"):
        check_engine("tgi")
    check_engine("hf")  # any device


def test_vllm_without_a_gpu_names_the_extra_and_engine_hf(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LaunchError, match=r"engine=vllm .*gpt4llm\[vllm\].*no CUDA GPU here: use engine=hf"):
        check_engine("vllm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(LaunchError, match=r"model.device=cpu: use engine=hf"):
        check_engine("vllm", device="cpu")


def test_vllm_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"engine=vllm needs vLLM: pip install 'gpt4llm\[vllm\]'"):
        check_engine("vllm", device="cuda:0")


@pytest.mark.parametrize(
    "command",
    [
        ["gpt4llm.generate", "eval=demo", "eval.demo.num_records=2"],
        # before the prompts are read (there are none) and before MT-Bench's questions are fetched (offline here)
        ["gpt4llm.bestofn", "sft_model=MODEL", "reward_model=MODEL", "prompts=missing.jsonl"],
        ["gpt4llm.evaluate", "metric=mt_bench"],
    ],
    ids=["generate", "bestofn", "evaluate"],
)
def test_engine_vllm_on_this_cpu_is_one_error_line(command, tiny_model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GPT4LLM_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    module, *args = command
    args = [a.replace("MODEL", str(tiny_model_dir)) for a in args]
    if module != "gpt4llm.bestofn":
        args.append(f"model.path={tiny_model_dir}")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "engine=vllm", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=tmp_path,
        env=dict(env, CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: engine=vllm runs vLLM on a CUDA GPU (pip install 'gpt4llm[vllm]'), and no CUDA GPU here: use engine=hf"
    )
    assert not list((tmp_path / "logs").rglob("*.jsonl"))  # nothing written


def test_an_adapter_with_new_tokens_rows_points_to_the_merged_export(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from gpt4llm.data.tokenizer import load_tokenizer

    adapter = tmp_path / "export" / "adapter"
    adapter.mkdir(parents=True)
    config = {"r": 8, "base_model_name_or_path": str(tiny_model_dir), "trainable_token_indices": {"embed": [3]}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base_config = AutoConfig.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"vLLM's LoRA does not serve; give engine=vllm the merged export .*export\)"):
        vllm_engine.lora_rank(str(adapter), tokenizer, base_config)
    config.pop("trainable_token_indices")
    for refused, why in (({"use_dora": True}, "is DoRA"), ({"bias": "all"}, "trains biases"), ({"r": 1024}, "rank")):
        (adapter / "adapter_config.json").write_text(json.dumps(config | refused))
        with pytest.raises(ConfigError, match=f"{why}.*which vLLM's LoRA does not serve"):
            vllm_engine.lora_rank(str(adapter), tokenizer, base_config)
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"q_proj": 16}}))
    assert vllm_engine.lora_rank(str(adapter), tokenizer, base_config) == 16
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert vllm_engine.lora_rank(str(adapter), tokenizer, base_config) == 8
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 4}))
    assert vllm_engine.lora_rank(str(adapter), tokenizer, base_config) == 8  # vLLM takes 1, 8, 16, ...


# --- vLLM's own types, where vLLM is importable (its CUDA wheel imports on a CPU machine) -------------------------


@pytest.fixture
def engine(tiny_model_dir):
    pytest.importorskip("vllm")
    from transformers import AutoConfig, GenerationConfig

    from gpt4llm.data.tokenizer import load_tokenizer

    model = VLLMModel.__new__(VLLMModel)  # no vllm.LLM: it needs the GPU; the mappings below do not
    model.config = AutoConfig.from_pretrained(tiny_model_dir)
    model.context = 64  # vLLM's max_model_len
    model.generation_config = GenerationConfig(top_k=None)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return VLLMEngine(model, tokenizer, [tokenizer.eos_token_id, 7], max_rows=2)


def test_requests_become_vllms_sampling_params(engine):
    from vllm import SamplingParams

    greedy = engine.sampling_params(Request((5, 6, 7), 100, stop=("###",)))
    assert isinstance(greedy, SamplingParams)
    assert greedy.temperature == 0.0 and greedy.max_tokens == 61  # the context (64) less the prompt
    assert greedy.stop == ["###"] and set(greedy.stop_token_ids) == {engine.tokenizer.eos_token_id, 7}
    sampled = engine.sampling_params(Request((5,), 10, Sampling(0.7, 0.9), seed=1234))
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed) == (0.7, 0.9, 50, 1234)
    assert sampled.max_tokens == 10 and not sampled.stop
    no_top_k = engine.sampling_params(Request((5,), 10, Sampling(1.0, 1.0, top_k=0), seed=1))
    assert no_top_k.top_k in (0, -1)  # vLLM's "every token"


def test_vllms_outputs_become_our_completions(engine):
    from vllm.outputs import CompletionOutput

    def out(tokens, finish, stop_reason=None):
        return CompletionOutput(0, "", tokens, None, None, finish_reason=finish, stop_reason=stop_reason)

    decode = engine.tokenizer.decode
    request = Request((5,), 8, stop=(decode([12]),))
    eos = engine.tokenizer.eos_token_id
    done = engine.completion(request, out([20, 21, eos], "stop"))
    assert (done.finish_reason, done.token_ids, done.stop_id, done.num_tokens) == (EOS, (20, 21), eos, 2)
    assert done.text == decode([20, 21], skip_special_tokens=True)
    turn = engine.completion(request, out([20, 7], "stop", 7))
    assert (turn.finish_reason, turn.token_ids, turn.stop_id) == (EOS, (20,), 7)
    cut = engine.completion(request, out([20, 12], "stop", decode([12])))  # vLLM ends at the completing token
    assert cut.finish_reason == STOP and cut.num_tokens == 2
    assert cut.text == decode([20, 12], skip_special_tokens=True).split(decode([12]))[0]
    long = engine.completion(request, out([20] * 8, "length"))
    assert (long.finish_reason, long.num_tokens, long.stop_id) == (LENGTH, 8, None)
    with pytest.raises(TooFewSucceeded, match="finish_reason 'abort'; run the same command again"):
        engine.completion(request, out([20], "abort"))


def test_settings_vllm_refuses_are_one_line(engine):
    with pytest.raises(ConfigError, match="engine=vllm refuses these decoding settings: .*temperature"):
        engine.sampling_params(Request((5,), 10, Sampling(temperature=3.0), seed=1))


def test_too_long_prompts_are_answered_without_vllm(engine):
    requests = [Request(tuple(range(64)), 4), Request((), 4), Request((5,), 0)]
    assert [(i, c.finish_reason) for i, c in engine.run(requests)] == [(0, TOO_LONG), (1, LENGTH), (2, LENGTH)]
