"""Every conf/experiment/*.yaml runs end to end: its own recipe (schedule, warmup, global batch, val_size, checkpoint
interval) for 3 optimizer steps on real-format data, with a tiny model of the experiment's architecture standing in
for its 7B or 1.3B one; then the export is reloaded and compared by logits with the last checkpoint's weights.

A new experiment file is tested without anyone adding it here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers.configs import CONF, SHARED_DATA, compose_train
from helpers.runs import run_cli, scalars

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STEPS = 3


@pytest.fixture(scope="module")
def tiny_opt_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A random-init OPT (the paper's reward-model architecture) with the tiny tokenizer."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=2,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny-opt"
    OPTForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_opt_dir, tmp_path_factory) -> Path:
    """A reward-model export in the paper's RM architecture (OPT with a one-output head), random: what online RL's
    experiments score with (reward.path)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny-rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_opt_dir, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_opt_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_chat_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny LLaMA as a chat model: its tokenizer carries a Llama-3-style chat template of its own (header tokens,
    <|eot_id|>), as a chat model's does; it has no tokenizer.model, so its ids come from tokenizers."""
    import shutil

    from gpt4llm.data.formats import prompt_format
    from gpt4llm.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-chat"
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(out))
    prompt_format("llama3").prepare_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def instruction_file(tmp_path_factory) -> Path:
    """Real GPT-4 records where the shared sample is here, else generated records in the same Alpaca format."""
    sample = SHARED_DATA / "alpaca_gpt4_sample_1k.json"
    if sample.exists():
        return sample
    from gpt4llm.data.demo import write_demo_file

    return write_demo_file(tmp_path_factory.mktemp("data") / "alpaca_like.json", num_records=600)


@pytest.fixture(scope="module")
def comparison_file(instruction_file, tmp_path_factory) -> Path:
    """comparison_data_v2's layout: per prompt, three scored responses (a good, a cut and another prompt's answer),
    for 1,100 prompts: the paper experiment holds 1,000 out and trains 3 steps of 64 pairs on the rest."""
    records = json.loads(instruction_file.read_text())
    rng = random.Random(0)
    rows = []
    for i in range(1100):
        record = records[i % len(records)]
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "") + f" (#{i})"
        other = records[rng.randrange(len(records))]["output"]
        rows.append(
            {
                "user_input": prompt,
                "responses_and_scores": [
                    {"response": record["output"], "score": 9.0, "source": "gpt4"},
                    {
                        "response": record["output"][: len(record["output"]) // 2],
                        "score": 6.0,
                        "source": "text-davinci-003",
                    },
                    {"response": other, "score": 2.0, "source": "icm-1.3b"},
                ],
            }
        )
    path = tmp_path_factory.mktemp("data") / "comparison_data_v2.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_end_to_end(
    experiment,
    tmp_path,
    sentencepiece_model_dir,
    tiny_opt_dir,
    tiny_chat_dir,
    tiny_rm_dir,
    instruction_file,
    comparison_file,
):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from gpt4llm.data.tokenizer import load_tokenizer

    recipe = compose_train([f"experiment={experiment}"])
    rm = recipe.task._target_.endswith("RewardModule")
    pairs = rm or recipe.task._target_.endswith("DPOModule")  # both train on comparison data
    online_rl = recipe.task._target_.startswith("gpt4llm.models.rl_module.")  # prompts, and a reward model
    substitute = {"llama": sentencepiece_model_dir, "opt": tiny_opt_dir}[recipe.model.arch.model_type]
    if recipe.data.get("template", "alpaca") == "chat":  # a chat model of LLaMA's architecture, template included
        substitute = tiny_chat_dir
    run = tmp_path / "run"
    run_cli(
        "gpt4llm.train",
        [
            f"experiment={experiment}",
            f"model.path={substitute}",
            f"data.path={comparison_file if pairs else instruction_file}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={run}",
            f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1",
            # a recipe that holds out more than this small file has (alpaca-lora's 2,000) holds out 100
            *([f"data.val_size={min(recipe.data.val_size, 100)}"] if recipe.data.val_size else []),
            *([f"reward.path={tiny_rm_dir}"] if online_rl else []),
        ],
        cwd=tmp_path,
    )

    log = (run / "train.log").read_text()
    accumulation = recipe.global_batch_size // recipe.data.batch_size
    assert f"Global batch {recipe.global_batch_size}: gradient accumulation {accumulation}" in log
    # LLaMA's stand-in ships a SentencePiece model: its ids come from SentencePiece itself, as stanford_alpaca's did
    assert f"ids by {'sentencepiece' if substitute == sentencepiece_model_dir else 'tokenizers'}" in log
    logged = scalars(run)
    assert len(logged["train/loss"]) == STEPS and all(map(torch.isfinite, torch.tensor(logged["train/loss"])))
    # warmup (ceil of the ratio of the steps) then the schedule, never above the recipe's peak
    # (TensorBoard stores float32: the peak may read a rounding above the recipe's value)
    assert 0 < max(logged["train/lr"]) <= recipe.task.optimizer.lr * (1 + 1e-6)
    assert (
        logged["train/lr"][0] == 0.0 if recipe.task.warmup_ratio else logged["train/lr"][0] == max(logged["train/lr"])
    )
    if recipe.data.val_size == 0:
        assert "nothing is held out" in log and not any(tag.startswith("val/") for tag in logged)
    else:
        assert ("val/reward" if online_rl else "val/loss") in logged

    # The export against the last checkpoint's weights, loaded by Lightning's own format, not by our export code.
    auto = AutoModelForSequenceClassification if rm else AutoModelForCausalLM
    exported = auto.from_pretrained(run / "export", dtype=torch.float32).eval()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == STEPS
    tokenizer = load_tokenizer(str(run / "export"))
    if recipe.peft.method == "lora":  # the checkpoint holds the adapters: peft's own model over the base takes them
        from_checkpoint = adapter_model_from_checkpoint(auto, substitute, tokenizer, recipe.peft, state)
    else:
        from_checkpoint = auto.from_pretrained(run / "export", dtype=torch.float32).eval()
        from_checkpoint.load_state_dict(
            {k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=True
        )
    batch = tokenizer(
        ["Give three tips for staying healthy.", "把这句话翻译成英文。"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        got, want = exported(**batch).logits, from_checkpoint(**batch).logits
    if recipe.peft.get("quantization"):  # merged into the dequantized base; trained through 4-bit weights in bf16
        assert float((got - want).norm() / want.norm()) < 3e-2
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def adapter_model_from_checkpoint(auto, base_dir, tokenizer, settings, state):
    """peft's LoraModel over the base (4-bit and dequantized for QLoRA, as trained), the checkpoint's adapter tensors
    loaded into it; every adapter tensor of the checkpoint must land."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    from gpt4llm.models.hf import resize_embeddings_with_mean

    settings = OmegaConf.to_container(settings)
    quantization = settings.pop("quantization", None)
    extra = {}
    if quantization:
        dtype = getattr(torch, quantization.pop("bnb_4bit_compute_dtype"))
        extra = {
            "quantization_config": BitsAndBytesConfig(**quantization, bnb_4bit_compute_dtype=dtype),
            "device_map": {"": "cpu"},
        }
    base = auto.from_pretrained(
        base_dir, **({"num_labels": 1} if auto.__name__.endswith("Classification") else {}), **extra
    )
    if quantization:
        base = base.dequantize()
    base = base.float()
    grown = list(range(base.get_input_embeddings().num_embeddings, len(tokenizer)))  # the tokens the run added
    if grown:
        resize_embeddings_with_mean(base, len(tokenizer))
    settings.pop("method"), settings.pop("name", None), settings.pop("lr", None)  # ours, not LoraConfig's
    task = "SEQ_CLS" if auto.__name__.endswith("Classification") else "CAUSAL_LM"
    if grown:  # their rows train with the adapters (the output layer's too where it is not tied)
        heads = {"embed_tokens": grown} | ({"lm_head": grown} if task == "CAUSAL_LM" else {})
        settings["trainable_token_indices"] = heads
    model = get_peft_model(base, LoraConfig(task_type=task, **{k: v for k, v in settings.items() if v is not None}))
    result = model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    return model.eval()


TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
# What a GPU trainer file needs to run on this CPU, and nothing more: its other keys (epochs, clipping, logging,
# sampler, ...) run as written. bf16 stands in for a V100's fp16, which the CPU has no kernels for.
ON_CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1"]
CPU_PRECISION = {"v100x16": ["trainer.precision=bf16-mixed"]}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_file_trains(trainer, tmp_path):
    from helpers.configs import demo_overrides

    recipe = compose_train([f"trainer={trainer}"]).trainer
    extra = ON_CPU + CPU_PRECISION.get(trainer, []) if recipe.accelerator != "cpu" else []
    run_cli(
        "gpt4llm.train",
        demo_overrides(
            tmp_path,
            f"trainer={trainer}",
            *extra,
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "validate_first=false",
            "callbacks.exact_match=null",
        ),
        cwd=tmp_path,
    )
    assert len(scalars(tmp_path / "run")["train/loss"]) == 2 and (tmp_path / "run" / "export" / "config.json").exists()
