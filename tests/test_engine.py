"""The generation engine (models.engine) against plain transformers `model.generate`, one prompt at a time (the oracle
the issue names): continuous batching with rows leaving and joining, per-request limits, stop ids and stop strings
give the very tokens of unbatched greedy decoding (fp32); sampled answers depend only on the request and its seed."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpt4llm.data.demo import make_demo_records
from gpt4llm.data.prompts import format_prompt
from gpt4llm.inference.resumable_generation import generate_to_file
from gpt4llm.models.engine import Engine, Request, Sampling

RECORDS = make_demo_records(8, seed=11)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.set_num_threads(threads)


def prompt_ids(tokenizer, records=RECORDS) -> list[tuple[int, ...]]:
    return [tuple(tokenizer(format_prompt(r["instruction"], r["input"]))["input_ids"]) for r in records]


def plain_generate(model, tokenizer, ids, max_new_tokens, stop_ids) -> list[int]:
    """transformers' generate on one unpadded prompt: the tokens before the first stop id."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    return next((out[:k] for k, t in enumerate(out) if t in stop_ids), out)


def test_greedy_with_rows_leaving_and_joining_equals_generate_one_prompt_at_a_time(model, tokenizer):
    prompts = prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) > 3, "the prompts must differ in length for padding to matter"
    eos = tokenizer.eos_token_id
    free = [plain_generate(model, tokenizer, p, 12, [eos]) for p in prompts]
    # stop ids met at different steps: the 3rd token of prompt 0's answer and the 6th of prompt 2's end those (and
    # any other answer that meets them); each request has its own max_new_tokens; one prompt has a stop string
    stop_ids = [eos, free[0][2], free[2][5]]
    limits = [12, 9, 12, 4, 12, 10, 7, 12]
    oracle = [plain_generate(model, tokenizer, p, n, stop_ids) for p, n in zip(prompts, limits)]
    s = next(i for i in (5, 7, 4, 1, 6) if len(oracle[i]) >= 6)
    stop_text = tokenizer.decode(oracle[s][3:5], skip_special_tokens=True).strip()
    assert stop_text, "the stop string must be some text"
    requests = [Request(p, n, stop=(stop_text,) if i == s else ()) for i, (p, n) in enumerate(zip(prompts, limits))]
    # three rows at a time: finished rows leave and waiting prompts join the running cache
    got = dict(Engine(model, tokenizer, stop_ids, max_rows=3).run(requests))
    assert sorted(got) == list(range(len(prompts)))
    reasons = set()
    for i, n in enumerate(limits):
        expected = oracle[i]
        text = tokenizer.decode(expected, skip_special_tokens=True)
        if i == s:
            assert got[i].finish_reason == "stop" and got[i].text == text[: text.find(stop_text)]
            assert list(got[i].token_ids) == expected[: len(got[i].token_ids)]
        else:
            assert list(got[i].token_ids) == expected, i
            assert got[i].text == text
            assert got[i].finish_reason == ("length" if len(expected) == n else "eos")
        reasons.add(got[i].finish_reason)
    assert reasons == {"eos", "length", "stop"}, "every way to end must be met"


def test_sampled_answers_depend_only_on_the_request_and_its_seed(model, tokenizer):
    prompts = prompt_ids(tokenizer)
    sampling = Sampling(temperature=1.3, top_p=0.95, top_k=40)
    requests = [Request(p, 8, sampling, seed=100 + i) for i, p in enumerate(prompts)]
    engine = Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=8)
    together = {i: c.token_ids for i, c in engine.run(requests)}
    assert len({together[i] for i in together}) > 1
    # other batch sizes, another order, and half of them alone (as a resumed run has them): the same answers
    for max_rows in (1, 3):
        again = {i: c.token_ids for i, c in Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows).run(requests)}
        assert again == together
    order = list(range(len(requests)))
    random.Random(0).shuffle(order)
    subset = order[:4]
    alone = dict(engine.run([requests[i] for i in subset]))
    assert {subset[k]: c.token_ids for k, c in alone.items()} == {i: together[i] for i in subset}
    # another seed, another answer
    other = dict(engine.run([Request(prompts[0], 8, sampling, seed=7)]))
    assert other[0].token_ids != together[0] or other[0].token_ids == ()


def test_a_sampled_generate_killed_and_resumed_writes_the_same_answers(model, tokenizer, tmp_path):
    records = [{"id": f"q{i}", "instruction": r["instruction"], "input": r["input"]} for i, r in enumerate(RECORDS)]
    decoding = {"max_new_tokens": 6, "do_sample": True, "num_samples": 2, "temperature": 1.2, "top_p": 0.9}
    path = tmp_path / "responses.jsonl"
    generate_to_file(model, tokenizer, records, path, decoding, batch_size=4, progress=None, seed=5)
    whole = {json.loads(x)["id"]: json.loads(x)["responses"] for x in path.read_text().splitlines()}
    assert len(whole) == len(records)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed while writing the 4th line
    counts = generate_to_file(model, tokenizer, records, path, decoding, batch_size=3, progress=None, seed=5)
    assert (counts["already_done"], counts["generated"]) == (3, 5)
    resumed = {json.loads(x)["id"]: json.loads(x)["responses"] for x in path.read_text().splitlines()}
    assert resumed == whole


def test_a_prompt_longer_than_the_context_is_reported_not_a_crash(model, tokenizer, tmp_path):
    context = model.config.max_position_embeddings
    long_input = " ".join(["word"] * (context + 10))
    records = [
        {"id": "long", "instruction": "Repeat.", "input": long_input},
        {"id": "ok", "instruction": "Say hi.", "input": ""},
    ]
    path = tmp_path / "responses.jsonl"
    counts = generate_to_file(model, tokenizer, records, path, {"max_new_tokens": 4, "do_sample": False}, progress=None)
    lines = {json.loads(x)["id"]: json.loads(x) for x in path.read_text().splitlines()}
    assert lines["long"]["finish_reason"] == "prompt_too_long" and lines["long"]["response"] == ""
    assert lines["ok"]["finish_reason"] in ("eos", "length")
    assert counts["prompt_too_long"] == 1 and counts["generated"] == 2


def test_a_batch_whose_kv_cache_would_not_fit_is_made_smaller_before_it_starts(model, tokenizer, monkeypatch, caplog):
    """The KV cache of 8 rows is planned against the free memory: with room for 3, three run at a time (said once),
    with the same answers; with room for none, one line says so before anything runs."""
    import gpt4llm.models.engine as engine_module
    from gpt4llm.errors import ConfigError
    from gpt4llm.models.engine import kv_bytes_per_token

    prompts = prompt_ids(tokenizer)
    requests = [Request(p, 6) for p in prompts]
    config = model.config
    assert (
        kv_bytes_per_token(model)
        == 2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads)
        * 4
    )
    plenty = dict(Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=8).run(requests))
    per_row = kv_bytes_per_token(model) * (max(map(len, prompts)) + 6) + 4 * config.vocab_size
    monkeypatch.setattr(engine_module, "free_memory", lambda device: int(3.5 * per_row / engine_module.MEMORY_SHARE))
    engine = Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=8)
    assert engine.rows_that_fit(requests) == 3
    with caplog.at_level("WARNING", logger="gpt4llm.models.engine"):
        assert dict(engine.run(requests)) == plenty
    assert "generating 3 sequences at a time instead of 8" in caplog.text
    monkeypatch.setattr(engine_module, "free_memory", lambda device: per_row // 2)
    with pytest.raises(ConfigError, match="generation does not fit in memory: .* lower max_new_tokens"):
        list(Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=8).run(requests))


def test_a_cache_whose_rows_cannot_leave_keeps_ended_rows_until_the_batch_ends(model, tokenizer, monkeypatch):
    """Sliding-window and recurrent caches cannot drop or add rows: the batch runs whole (ended rows fed padding),
    then the next; the answers are the same."""
    import gpt4llm.models.engine as engine_module

    prompts = prompt_ids(tokenizer)
    requests = [Request(p, n) for p, n in zip(prompts, [3, 9, 5, 12, 2, 7, 12, 4])]
    stops = [tokenizer.eos_token_id]
    joining = dict(Engine(model, tokenizer, stops, max_rows=3).run(requests))
    selected = []
    monkeypatch.setattr(engine_module, "mergeable", lambda cache: cache is None)
    monkeypatch.setattr(engine_module, "select", lambda *a: selected.append(a) or pytest.fail("rows dropped"))
    static = dict(Engine(model, tokenizer, stops, max_rows=3).run(requests))
    assert static == joining and not selected


def _synced_rank(rank: int, init: str, model_dir: str, results: str) -> None:
    import torch.distributed as dist

    from gpt4llm.data.tokenizer import load_tokenizer

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    prompts = prompt_ids(tokenizer)[: 4 if rank == 0 else 1]
    requests = [Request(p, 10 if rank == 0 else 2) for p in prompts]
    got = {i: c.token_ids for i, c in Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=2).run(requests)}
    with open(f"{results}.{rank}", "w") as f:
        json.dump({"answers": {str(i): list(t) for i, t in got.items()}, "forwards": len(forwards)}, f)
    dist.destroy_process_group()


def test_ranks_generating_together_run_as_many_forwards_as_the_busiest(model, tokenizer, tiny_model_dir, tmp_path):
    """Validation under ZeRO-3 or FSDP: every forward gathers the weights from all ranks, so a rank with less to
    generate runs forwards of its own until the busiest is done (a hang before); the answers are unchanged."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_synced_rank, args=(init, str(tiny_model_dir), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"r.{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] > 3
    prompts = prompt_ids(tokenizer)
    alone = dict(
        Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=2).run([Request(p, 10) for p in prompts[:4]])
    )
    assert ranks[0]["answers"] == {str(i): list(c.token_ids) for i, c in alone.items()}


def test_a_request_joining_a_running_batch_waits_until_its_kv_cache_fits(model, tokenizer, monkeypatch):
    """serve's case: a long request arriving while others run joins only once the cache of every row at its length
    fits the memory planned at the start; until then it waits, and its answer is what it would be alone."""
    import gpt4llm.models.engine as engine_module

    prompts = prompt_ids(tokenizer)
    short = [Request(prompts[0], 6), Request(prompts[1], 10)]
    long = Request(prompts[2], 40)
    engine = Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=4, join_at=1)
    long_row = engine._row_bytes(engine._span(long))
    assert 3 * long_row > 2.5 * long_row >= 2 * long_row and engine._row_bytes(engine._span(short[1])) < long_row
    monkeypatch.setattr(engine_module, "free_memory", lambda device: int(2.5 * long_row / engine_module.MEMORY_SHARE))
    events, offered = [], []

    def more(free: int) -> list[Request]:
        if offered:
            return []
        offered.append(free)
        return [long]

    got = {}
    for i, completion in engine.run(short, on_token=lambda i, t: events.append(("token", i)), more=more):
        events.append(("done", i))
        got[i] = completion
    assert len(offered) == 1 and sorted(got) == [0, 1, 2]
    first_long = events.index(("token", 2))
    assert any(e[0] == "done" for e in events[:first_long]), "it joined while both others ran"
    alone = dict(Engine(model, tokenizer, [tokenizer.eos_token_id], max_rows=1).run([long]))
    assert got[2].token_ids == alone[0].token_ids
