"""Online RL (task=grpo|rloo, models.rl_module): the per-token log-probabilities it trains on against the model's own
logits, seeded rollouts, the first step (ratio 1, KL 0), its prompt data, its errors; the loss arithmetic itself is
checked against TRL in tests/test_policy_gradient.py. The CLI tests (slow) train: a reward rises, stays flat at lr 0,
and a resumed run equals the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt4llm.data.prompt_datamodule import TOO_LONG, build_prompt_splits
from gpt4llm.data.samplers import RepeatedBlocksSampler
from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.models.rewards import build_rewards, score_completions
from helpers.configs import TINY_OVERRIDES
from helpers.runs import run_cli, scalars_by_step

LETTERS = {"kind": "function", "fn": "gpt4llm.models.reward_functions:letter_share"}


def module(tiny_model_dir, tokenizer, **settings):
    from gpt4llm.models.rl_module import GRPOModule, RLOOModule

    kind = RLOOModule if settings.pop("method", "grpo") == "rloo" else GRPOModule
    defaults = {"reward": LETTERS, "num_generations": 4, "max_completion_length": 12, "attn_implementation": "sdpa"}
    settings = defaults | settings
    m = kind(tokenizer, model_path=str(tiny_model_dir), optimizer={"lr": 1e-3}, template="alpaca", **settings)
    m.configure_model()
    m.rewards = build_rewards(m.reward_settings)
    return m


def rows(tokenizer, prompts: list[str]) -> list[dict]:
    return [
        {
            "index": i,
            "input_ids": tokenizer(p)["input_ids"],
            "user_text": p,
            "score_record": json.dumps({"prompt": p}),
            "fields": json.dumps({"output": "x"}),
        }
        for i, p in enumerate(prompts)
    ]


PROMPTS = ["Name a colour.", "Count to three, please, slowly and in words."]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_are_the_models_own_at_each_completion_token(temperature, tiny_model_dir, tokenizer):
    """...of the distribution sampled from: the logits divided by the temperature, as TRL scores them."""
    m = module(tiny_model_dir, tokenizer, temperature=temperature)
    rollout = m.rollout(rows(tokenizer, PROMPTS), 4, ["a", "b"], "train")
    logps, mask, entropies = m.completion_logps(m.model, rollout, entropy=True)
    for r, (prompt, completion) in enumerate(zip(rollout["prompt_ids"], rollout["completion_ids"])):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            table = torch.log_softmax(m.model(input_ids=ids).logits[0].float() / temperature, dim=-1)
        expected = table[len(prompt) - 1 : len(prompt) - 1 + len(completion)].gather(
            -1, torch.tensor(completion).unsqueeze(-1)
        )[:, 0]
        n = len(completion)
        assert mask[r, :n].tolist() == [1.0] * n and not mask[r, n:].any()
        torch.testing.assert_close(logps[r, :n].detach(), expected, atol=2e-5, rtol=0)
        full = table[len(prompt) - 1 : len(prompt) - 1 + n]
        torch.testing.assert_close(entropies[r, :n], -(full.exp() * full).sum(-1), atol=2e-4, rtol=0)


def test_a_stop_id_that_ended_a_completion_is_trained_on(tiny_model_dir, tokenizer):
    m = module(tiny_model_dir, tokenizer, max_completion_length=20)
    eos = tokenizer.eos_token_id

    def likelier_eos(layer, inputs, logits):  # EOS about 1 in 10: some completions end, some are cut
        logits[..., eos] += 4.0
        return logits

    m.model.lm_head.register_forward_hook(likelier_eos)
    rollout = m.rollout(rows(tokenizer, PROMPTS), 4, ["a", "b"], "train")
    ended = [ids for ids, cut in zip(rollout["completion_ids"], rollout["truncated"]) if not cut]
    cut = [ids for ids, cut in zip(rollout["completion_ids"], rollout["truncated"]) if cut]
    assert ended and cut
    assert all(ids[-1] == eos and eos not in ids[:-1] for ids in ended)
    assert all(len(ids) == 20 and eos not in ids for ids in cut)
    logps, mask, _ = m.completion_logps(m.model, rollout)
    assert mask.sum(1).tolist() == [float(len(ids)) for ids in rollout["completion_ids"]]


def test_rollouts_are_seeded_per_prompt_whatever_they_are_batched_with(tiny_model_dir, tokenizer):
    m = module(tiny_model_dir, tokenizer)
    both = m.rollout(rows(tokenizer, PROMPTS), 4, ["k0", "k1"], "train")
    alone = m.rollout(rows(tokenizer, PROMPTS[1:]), 4, ["k1"], "train")
    assert both["completion_ids"][4:] == alone["completion_ids"]
    again = m.rollout(rows(tokenizer, PROMPTS), 4, ["k0", "k1"], "train")
    assert again["completion_ids"] == both["completion_ids"]
    other = m.rollout(rows(tokenizer, PROMPTS), 4, ["k0", "k2"], "train")
    assert other["completion_ids"][4:] != both["completion_ids"][4:]
    assert len(set(map(tuple, both["completion_ids"][:4]))) > 1  # the generations of a group differ


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_the_first_step_has_ratio_one_and_kl_zero(method, tiny_model_dir, tokenizer):
    m = module(tiny_model_dir, tokenizer, method=method, beta=0.1, num_iterations=2)
    batch = {"index": torch.tensor([0, 1]), "rows": rows(tokenizer, PROMPTS)}
    rollout = m.rollout_for(batch, 0)
    logps, mask, _ = m.completion_logps(m.model, rollout)
    torch.testing.assert_close(rollout["old_logps"], logps.detach(), atol=0, rtol=0)  # ratio exactly 1
    torch.testing.assert_close(rollout["ref_logps"], logps.detach(), atol=0, rtol=0)  # policy = reference
    loss, metrics = m.loss(logps, rollout, mask)
    assert float(metrics["kl"]) == 0.0
    advantages = rollout["advantages"]
    if method == "grpo":  # ratio 1, KL 0: dapo's loss is -sum(A_i n_i) / sum(n_i)
        assert all(float(metrics[f"clip_ratio/{k}_mean"]) == 0.0 for k in ("low", "high", "region"))
        expected = -(advantages * mask.sum(1)).sum() / mask.sum()
    else:  # the KL taken from the rewards is 0: RLOO's advantages of the raw rewards, -mean(A)
        rewards = rollout["rewards"].view(-1, 4)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / 3
        torch.testing.assert_close(advantages, (rewards - baseline).view(-1))
        expected = -advantages.mean()
    torch.testing.assert_close(loss.detach(), expected.to(loss), atol=1e-6, rtol=0)
    # the second iteration reuses the rollout; a third step generates anew
    assert m.rollout_for(batch, 1) is rollout
    assert m.rollout_for(batch, 2) is not rollout


def test_grpo_learns_on_a_batch_the_reward_goes_up(tiny_model_dir, tokenizer):
    """Twenty GRPO steps on two prompts with a dense reward raise it: the loss's sign and the advantages are right."""
    m = module(tiny_model_dir, tokenizer, max_completion_length=8)
    optimizer = torch.optim.AdamW(m.model.parameters(), lr=3e-3)
    before = None
    for step in range(20):
        batch = {"index": torch.tensor([0, 1]), "rows": rows(tokenizer, PROMPTS)}
        rollout = m.rollout(batch["rows"], 8, [f"{step}:0", f"{step}:1"], "train")
        rollout["old_logps"] = rollout["ref_logps"] = None
        rollout["advantages"], _ = m.advantages(rollout)
        m.num_generations = 8
        logps, mask, _ = m.completion_logps(m.model, rollout)
        loss, _ = m.loss(logps, rollout, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = float(rollout["rewards"].mean()) if before is None else before
    after = float(m.rollout(rows(tokenizer, PROMPTS), 8, ["x", "y"], "train")["rewards"].mean())
    assert after > 2 * before and after > before + 0.05, (before, after)


def test_a_reward_model_of_another_tokenizer_scores_the_decoded_text(
    tiny_model_dir, sentencepiece_model_dir, tokenizer, tmp_path
):
    """The policy's tokenizer is a byte-level BPE, the reward model's a SentencePiece one: each completion is scored
    as that reward model scores the text (transformers' own forward over its tokenizer's ids of prompt, answer, EOS,
    the reward read at the last token), not from the policy's ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gpt4llm.data.prompts import format_prompt

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(sentencepiece_model_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(sentencepiece_model_dir).save_pretrained(rm_dir)
    m = module(tiny_model_dir, tokenizer)
    m.rewards = build_rewards({"kind": "model", "path": str(rm_dir)})
    prompt = "Name a colour."
    row = rows(tokenizer, [prompt])[0] | {"score_record": json.dumps({"instruction": prompt, "input": ""})}
    rollout = m.rollout([row], 4, ["k"], "train")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    for text, reward in zip(rollout["texts"], rollout["rewards"].tolist()):
        ids = rm_tokenizer(format_prompt(prompt) + text + rm_tokenizer.eos_token, return_tensors="pt")
        with torch.no_grad():
            expected = float(rm(**ids).logits[0, 0])
        assert reward == pytest.approx(expected, abs=1e-5)
    assert len(set(rollout["rewards"].tolist())) > 1


# --- a served judge as the reward ----------------------------------------------------------------------------------
def judge_spec(base_url: str, tmp_path: Path, **extra) -> dict:
    from omegaconf import OmegaConf

    from helpers.configs import CONF

    client = OmegaConf.to_container(OmegaConf.load(CONF / "client" / "openai.yaml"), resolve=False)
    return client | {
        "kind": "judge",
        "base_url": base_url,
        "model": "judge-model",
        "api_key_env": "RL_JUDGE_KEY",
        "cache": str(tmp_path / "answers.jsonl"),
        "timeout": 2,
        "backoff": 0.01,
        "max_retries": 2,
        "prices": {"prompt": 0.01, "completion": 0.03},
        "temperature": 0.0,
        "max_tokens": 64,
        "max_parse_retries": 1,
        **extra,
    }


def e_count(request) -> str:
    """A judge that scores an answer by its count of "e" (at most 10), the score on its first line."""
    answer = request["messages"][-1]["content"].split("### Response\n")[1].split("\n### End of Response")[0]
    return f"{min(10, answer.count('e'))}\nBecause of the letter e."


def test_a_served_judge_scores_each_completion_under_the_rubric_once(loopback, tmp_path, monkeypatch):
    from gpt4llm.evaluation.judge_reward import judge_reward
    from helpers.fake_servers import ChatServer

    monkeypatch.setenv("RL_JUDGE_KEY", "k")
    server = loopback(ChatServer, reply=e_count)
    [judge] = build_rewards(judge_spec(server.base_url, tmp_path), factories={"judge": judge_reward})
    completions = ["eee", "no", "tree here"]
    total, each = score_completions([judge], ["Say e.", "Say e.", "Spell."], completions, {}, [[1], [2], [3]])
    assert each["judge"].tolist() == [3.0, 0.0, 4.0] and total.tolist() == [3.0, 0.0, 4.0]
    assert all(r["model"] == "judge-model" and r["temperature"] == 0.0 for r in server.requests)
    asked = sorted(r["messages"][-1]["content"].split("\n### End of Response")[0] for r in server.requests)
    assert asked == [  # the rubric around each prompt and completion (requests run concurrently: in any order)
        "### Instruction\nSay e.\n### Response\neee",
        "### Instruction\nSay e.\n### Response\nno",
        "### Instruction\nSpell.\n### Response\ntree here",
    ]
    assert len(server.requests) == 3
    score_completions([judge], ["Say e.", "Say e.", "Spell."], completions, {}, [[1], [2], [3]])
    assert len(server.requests) == 3  # every reply came from the cache
    cost = judge.cost()
    assert cost["cached"] == 3 and cost["tokens"] > 0 and cost["usd"] > 0


def test_a_completion_the_judge_leaves_unscored_stops_the_run_with_one_line(loopback, tmp_path, monkeypatch):
    from gpt4llm.evaluation.judge_reward import judge_reward
    from helpers.fake_servers import ChatServer

    monkeypatch.setenv("RL_JUDGE_KEY", "k")
    server = loopback(ChatServer, reply=lambda request: "N/A")
    [judge] = build_rewards(judge_spec(server.base_url, tmp_path), factories={"judge": judge_reward})
    with pytest.raises(ConfigError, match=r"the judge judge-model at .* left 1 of 1 completions without a score"):
        score_completions([judge], ["p"], ["a"], {}, [[1]])
    assert len(server.requests) == 2  # asked again once (max_parse_retries)
    with pytest.raises(ConfigError, match=r"reward.rubric: must contain \{instruction\} and \{response\}"):
        build_rewards(
            judge_spec(server.base_url, tmp_path, rubric="Rate {response}"), factories={"judge": judge_reward}
        )


# --- settings and rewards that cannot work: one line naming them --------------------------------------------------
def test_settings_that_cannot_work_are_refused(tiny_model_dir, tokenizer):
    with pytest.raises(ConfigError, match="num_generations=1: a group needs at least 2"):
        module(tiny_model_dir, tokenizer, num_generations=1)
    with pytest.raises(ConfigError, match="reference=adapters needs a LoRA policy"):
        module(tiny_model_dir, tokenizer, beta=0.1, reference="adapters")
    with pytest.raises(ConfigError, match="loss_type='ppo'"):
        module(tiny_model_dir, tokenizer, loss_type="ppo")


def bad_count(prompts, completions, **_):
    return [1.0]


def raises(prompts, completions, **_):
    raise KeyError("answer")


def not_a_number(prompts, completions, **_):
    return [None] * len(completions)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("test_online_rl:bad_count", r"reward.fn=test_online_rl:bad_count: returned 1 values for 3 completions"),
        ("test_online_rl:raises", r"reward.fn=test_online_rl:raises: raised KeyError on 3 completions: 'answer'"),
        ("test_online_rl:not_a_number", r"returned None among its rewards"),
    ],
)
def test_a_reward_function_that_fails_is_named_with_what_it_did(fn, message):
    rewards = build_rewards({"kind": "function", "fn": fn})
    with pytest.raises(ConfigError, match=message):
        score_completions(rewards, ["p"] * 3, ["a", "b", "c"], {}, [[1], [2], [3]])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "function", "fn": "no_such_module:f"}, r"module no_such_module cannot be imported"),
        ({"kind": "function", "fn": "gpt4llm.models.reward_functions:nope"}, r"has no function 'nope'"),
        ({"kind": "judges"}, r"reward.kind='judges': choose function"),
        ({"kind": "judge"}, r"reward.kind=judge: a judge reward is built by `python -m gpt4llm.train`"),
        ({"kind": "model", "path": "/no/such/rm"}, r"reward.path=/no/such/rm: does not load as a reward model"),
    ],
)
def test_a_reward_that_does_not_load_stops_before_training(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_rewards(spec)


def test_several_rewards_are_summed_with_their_weights():
    rewards = build_rewards(
        LETTERS
        | {"weight": 2.0, "also": {"f1": {"kind": "function", "fn": "gpt4llm.models.reward_functions:reference_f1"}}}
    )
    total, each = score_completions(rewards, ["p", "p"], ["eee x", "y z"], {"output": ["x", "y z"]}, [[1], [2]])
    torch.testing.assert_close(each["letter_share"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(each["f1"], torch.tensor([2 / 3, 1.0]))
    torch.testing.assert_close(total, 2 * each["letter_share"] + each["f1"])


# --- prompts --------------------------------------------------------------------------------------------------------
def test_prompts_come_from_every_layout_rendered_as_training_renders_them(tmp_path, tokenizer):
    from gpt4llm.data.formats import prompt_format
    from gpt4llm.data.prompts import alpaca_prompt, format_prompt

    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"user_input": format_prompt("Say hi.").removesuffix("\n\n### Response:"), "responses_and_scores": []},
        {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]},
        {"instruction": "Long " * 300, "output": ""},
    ]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(records))
    splits, report = build_prompt_splits(path, tokenizer, prompt_format("alpaca"), 100, 0, 0, False)
    got = {r["index"]: r for r in splits["train"]}
    assert got[0]["prompt"] == format_prompt("Add 2 and 3.") and json.loads(got[0]["fields"])["output"] == "5"
    assert got[1]["prompt"] == format_prompt("Translate.", "chat") and got[1]["user_text"] == "Translate.\n\nchat"
    assert got[2]["prompt"] == format_prompt("Say hi.")
    assert got[3]["prompt"] == alpaca_prompt("Hello?") and json.loads(got[3]["fields"])["output"] == "Hi."
    assert got[0]["input_ids"] == tokenizer(format_prompt("Add 2 and 3."))["input_ids"]
    assert 4 not in got and report["skipped"] == {TOO_LONG: {"count": 1, "first_indices": [4]}}


def test_a_record_without_a_prompt_is_named(tmp_path, tokenizer):
    from gpt4llm.data.formats import prompt_format

    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "ok"}, {"question": "?"}]))
    with pytest.raises(RecordError, match=r"bad.json: record 1 has no prompt: give 'instruction'"):
        build_prompt_splits(path, tokenizer, prompt_format("alpaca"), 64, 0, 0, False)
    splits, report = build_prompt_splits(path, tokenizer, prompt_format("alpaca"), 64, 0, 0, True)
    assert len(splits["train"]) == 1 and sum(s["count"] for s in report["skipped"].values()) == 1


def test_each_generation_block_is_repeated_num_iterations_times_on_every_rank():
    for rank in range(2):
        sampler = RepeatedBlocksSampler(10, seed=3, block=4, repeats=2, rank=rank, world_size=2)
        shard = sampler.shard(0)
        assert len(shard) == len(sampler) == 16  # 5 prompts padded to 2 blocks of 4, each twice
        assert shard[0:4] == shard[4:8] and shard[8:12] == shard[12:16] and shard[0:4] != shard[8:12]
    once = RepeatedBlocksSampler(10, seed=3, block=4, repeats=1)
    assert sorted(once.shard(0)[:10]) == list(range(10))


# --- the CLI: it learns, and resumes exactly ------------------------------------------------------------------------
RUN = [
    "task=grpo",
    "reward=function",
    "reward.fn=gpt4llm.models.reward_functions:letter_share",
    "data.batch_size=4",
    "data.val_size=16",
    "task.num_generations=4",
    "task.max_completion_length=16",
    "trainer.log_every_n_steps=1",
    *TINY_OVERRIDES,
]


def train(tmp_path: Path, name: str, *extra: str) -> Path:
    run = tmp_path / name
    run_cli(
        "gpt4llm.train",
        [*RUN, f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}", *extra],
        cwd=tmp_path,
    )
    return run


@pytest.mark.slow
def test_grpo_learns_a_reward_on_held_out_prompts_and_stays_flat_at_lr_0(tmp_path):
    learned = scalars_by_step(
        train(tmp_path, "lr", "trainer.max_steps=40", "trainer.val_check_interval=20", "task.optimizer.lr=3e-3")
    )
    still = scalars_by_step(
        # lr 0 is refused by the config's checks; 1e-30 moves no fp32 weight
        train(tmp_path, "lr0", "trainer.max_steps=40", "trainer.val_check_interval=20", "task.optimizer.lr=1e-30")
    )
    start, end = learned["val/reward"][0], learned["val/reward"][max(learned["val/reward"])]
    assert len(learned["val/reward"]) == 3 and end > 2 * start and end - start > 0.1, learned["val/reward"]
    assert len(set(still["val/reward"].values())) == 1, still["val/reward"]  # the same samples of the same policy
    assert still["val/reward"][0] == start


@pytest.mark.slow
@pytest.mark.parametrize(("task", "strategy"), [("grpo", None), ("rloo", None), ("grpo", "ddp")])
def test_a_resumed_run_samples_and_trains_as_the_uninterrupted_one(task, strategy, tmp_path):
    """Under DDP each rank reuses its own rollouts (its own prompts) after the resume, not rank 0's."""
    import safetensors.torch

    from helpers.cpu_deepspeed import train_under

    # a checkpoint at step 3: between the two updates on the completions generated at step 2
    common = [
        *RUN,
        f"paths.data_dir={tmp_path / 'data'}",
        f"task={task}",
        "task.num_iterations=2",
        "data.val_size=0",
        "trainer.max_steps=6",
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.checkpoint.save_top_k=-1",
        *(("trainer.devices=2",) if strategy == "ddp" else ()),
    ]
    whole = train_under(tmp_path / "whole", strategy, [*common, f"hydra.run.dir={tmp_path / 'whole' / 'run'}"], "a")
    step3 = whole / "checkpoints" / "step3.ckpt"
    again = [*common, f"hydra.run.dir={tmp_path / 'resumed' / 'run'}", f"ckpt_path={step3}"]
    resumed = train_under(tmp_path / "resumed", strategy, again, "b")
    a, b = scalars_by_step(whole), scalars_by_step(resumed)
    for tag in ("train/loss", "train/reward", "train/completions/mean_length"):
        assert [a[tag][s] for s in (3, 4, 5)] == [b[tag][s] for s in (3, 4, 5)], tag
    ours = safetensors.torch.load_file(str(whole / "export" / "model.safetensors"))
    theirs = safetensors.torch.load_file(str(resumed / "export" / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_every_strategy_starts_at_ratio_one_and_kl_zero_and_exports_the_policy(strategy, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers.configs import demo_overrides
    from helpers.cpu_deepspeed import train_under

    args = [
        *(a for a in demo_overrides(tmp_path) if not a.startswith("data.exact_match_examples")),
        *RUN[:8],
        "task.beta=0.1",
        "task.num_iterations=2",
        "task.max_completion_length=8",
        "data.val_size=8",
        "trainer.max_steps=4",
        "trainer.precision=bf16-mixed",
        "validate_first=false",
        *(("trainer.devices=2",) if strategy in ("ddp", "fsdp2") else ()),
    ]
    run = train_under(tmp_path, strategy, args, run_id="grpo")
    logged = scalars_by_step(run)
    assert logged["train/kl"][0] == 0.0  # the policy is its reference at the first step
    assert logged["train/clip_ratio/region_mean"][0] == 0.0  # ratio 1: sampled by this very policy
    assert logged["train/kl"][3] > 0.0  # and moves away from it
    assert len(logged["train/reward"]) == 4 and "val/reward" in logged
    policy = AutoModelForCausalLM.from_pretrained(run / "export")
    assert policy.config.architectures == ["LlamaForCausalLM"]
    assert not any(k.startswith("reference") for k in policy.state_dict())


@pytest.mark.slow
def test_grpo_with_the_demo_reward_model_raises_its_score_above_the_sft_start(tmp_path):
    """The paper's loop on the demo: an SFT policy, a reward model trained on the demo's pairs, and GRPO from the SFT
    export rewarded by that reward model's export: the held-out mean RM score rises above the SFT policy's own."""
    from helpers.configs import demo_overrides, rm_overrides

    def run(name, overrides):
        return run_cli("gpt4llm.train", [*overrides, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)

    data = f"paths.data_dir={tmp_path / 'data'}"
    run("sft", [*demo_overrides(tmp_path), data, "trainer.max_steps=30", "callbacks.exact_match=null"])
    run("rm", [*rm_overrides(tmp_path), data, "trainer.max_steps=30"])
    rl = [
        *(a for a in demo_overrides(tmp_path) if not a.startswith(("data.exact_match", "trainer.max_steps"))),
        data,
        "task=grpo",
        f"model.path={tmp_path / 'sft' / 'export'}",
        "model.tiny=null",
        "reward=model",
        f"reward.path={tmp_path / 'rm' / 'export'}",
        "reward.normalize=true",  # in units of the RM's own spread on held-out pairs (its recorded mean and std)
        "task.num_generations=4",
        "task.max_completion_length=16",
        "task.optimizer.lr=3e-3",
        "data.batch_size=4",
        "data.val_size=16",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
    ]
    run("grpo", rl)
    logged = scalars_by_step(tmp_path / "grpo")["val/reward"]
    start, end = logged[0], logged[max(logged)]
    assert len(logged) == 2 and end > start + 1.0, logged  # by more than one standard deviation of the RM's rewards


@pytest.mark.slow
def test_grpo_trains_with_a_served_judge_as_its_reward(loopback, tmp_path):
    from helpers.fake_servers import ChatServer

    server = loopback(ChatServer, reply=e_count)
    run = tmp_path / "judged"
    run_cli(
        "gpt4llm.train",
        [
            *RUN[:1],
            *RUN[3:],
            "reward=judge",
            f"reward.base_url={server.base_url}",
            "reward.model=judge-model",
            "reward.api_key_env=RL_JUDGE_KEY",
            "reward.prices={prompt: 0.01, completion: 0.03}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={run}",
            "trainer.max_steps=2",
            "validate_first=false",
        ],
        cwd=tmp_path,
        RL_JUDGE_KEY="k",
    )
    logged = scalars_by_step(run)
    assert len(logged["train/rewards/judge/mean"]) == 2 and logged["train/rewards/judge/usd"][1] > 0
    asked = {m["messages"][-1]["content"].split("\n### Response")[0] for m in server.requests}
    assert len(server.requests) >= 2 * 4 * 4 and all(a.startswith("### Instruction\n") for a in asked)


def test_prepare_audits_the_prompts_online_rl_samples_from(tmp_path):
    """`prepare task=grpo` shows the prompts as the policy will get them (rendered, tokenized, the long ones
    counted), not the SFT examples of the same file."""
    from gpt4llm.data.prompts import format_prompt
    from gpt4llm.prepare import prepare
    from helpers.configs import compose_train

    cfg = compose_train(
        ["task=grpo", f"paths.data_dir={tmp_path / 'data'}", *TINY_OVERRIDES, "data.demo.num_records=60"]
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    report = prepare(cfg)
    assert report["records"] == 60 and report["max_prompt_length"] == 256 - 64 and report["template"] == "alpaca"
    row = json.loads((tmp_path / "run" / "prepared" / "train.jsonl").read_text().splitlines()[0])
    record = json.loads((tmp_path / "data" / "demo" / "demo_60_seed0.json").read_text())[row["index"]]
    assert row["prompt"] == format_prompt(record["instruction"], record["input"]) and "labels" not in row


@pytest.mark.slow
@pytest.mark.parametrize(("peft", "reference"), [("lora", "adapters"), ("qlora", "adapters"), ("qlora", "live")])
def test_adapters_start_at_kl_zero_and_export_the_merged_policy(peft, reference, tmp_path):
    """LoRA and QLoRA policies: the reference is the base with the adapters off, or a copy built as the policy's base
    is (4-bit under QLoRA, run with its adapters off): the first step's KL is exactly 0 either way."""
    from transformers import AutoModelForCausalLM

    from gpt4llm.errors import ConfigError
    from gpt4llm.models.adapters import check_4bit
    from gpt4llm.train import train as train_in_process
    from helpers.configs import compose_train, demo_overrides

    if peft == "qlora":
        try:
            check_4bit()
        except ConfigError as err:
            pytest.skip(str(err))
    overrides = [a for a in demo_overrides(tmp_path) if not a.startswith("data.exact_match")]
    cfg = compose_train(
        [
            *overrides,
            *RUN[:8],
            f"peft={peft}",
            "task.beta=0.1",
            f"task.reference={reference}",
            "task.max_completion_length=8",
            "data.val_size=8",
            "trainer.max_steps=3",
            "validate_first=false",
        ]
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    train_in_process(cfg)
    logged = scalars_by_step(tmp_path / "run")
    assert logged["train/kl"][0] == 0.0 and len(logged["train/reward"]) == 3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    assert not getattr(merged, "is_loaded_in_4bit", False) and not hasattr(merged, "peft_config")
