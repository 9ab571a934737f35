"""The `tiny` model: a random-init LLaMA-architecture model with a tokenizer trained on the demo text: a byte-level
BPE (the demo's), or a SentencePiece BPE made like LLaMA's (the stand-in for LLaMA in tests of the paper's runs).

Built locally and deterministically, so the demo, the tests and every CLI run offline with nothing downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gpt4llm.data.demo import make_demo_records
from gpt4llm.data.prompts import PROMPT_INPUT, PROMPT_NO_INPUT, format_prompt
from gpt4llm.errors import ConfigError
from gpt4llm.io import atomic, json_files, locks
from gpt4llm.io.model_dirs import refuse_foreign_directory

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def tokenizer_corpus(corpus_records: int, seed: int) -> list[str]:
    return [PROMPT_INPUT, PROMPT_NO_INPUT] + [
        format_prompt(r["instruction"], r["input"]) + r["output"] for r in make_demo_records(corpus_records, seed)
    ]


def build_tiny_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Spaces are tokens of their own, so a word has the same ids wherever it stands ("name: Irene" and, after
    # "### Response:", "Irene"): the demo's copying tasks are then plain copies, which a tiny model learns fast.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable, not only the demo's
            show_progress=False,
        ),
    )
    # Like LLaMA: BOS in front of every sequence, EOS only where the data puts it.
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_sentencepiece(corpus: list[str], vocab_size: int, directory: Path):
    """A SentencePiece BPE with LLaMA's settings (byte fallback, split digits, whitespace kept as is, ids 0/1/2 for
    <unk>/<s>/</s>, no pad), saved as `tokenizer.model` with its tokenizer config."""
    import sentencepiece

    from gpt4llm.data.tokenizer import load_pretrained_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    return load_pretrained_tokenizer(directory, "sentencepiece")


def build_tiny_model(
    path: str | Path,
    vocab_size: int = 1024,
    hidden_size: int = 192,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 8,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
    corpus_records: int = 4000,
    tokenizer_type: str = "bpe",
) -> Path:
    """Writes tokenizer and random-init weights to `path`, once per spec: later calls with the same spec reuse it."""
    path = Path(path)
    corpus = tokenizer_corpus(corpus_records, seed)
    spec = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        tokenizer_type=tokenizer_type,
        # the corpus itself, so that a change to the demo tasks rebuilds the tokenizer trained on them
        corpus_sha256=hashlib.sha256(json.dumps(corpus).encode()).hexdigest(),
    )
    spec_file = path / "tiny_spec.json"
    refuse_foreign_directory(path)
    # One builder at a time (the ranks of a multi-process run all call this): the others wait, then find it built.
    with locks.exclusive(path.with_name(path.name + ".lock")):
        if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
            return path
        # Written aside and renamed, so an interrupted build never leaves a half-written model.
        with atomic.atomic_path(path) as tmp:
            _write_tiny_model(tmp, corpus, spec)
    return path


def _write_tiny_model(tmp: Path, corpus: list[str], spec: dict) -> None:
    vocab_size, tokenizer_type = spec["vocab_size"], spec["tokenizer_type"]
    if tokenizer_type == "sentencepiece":
        tokenizer = build_tiny_sentencepiece(corpus, vocab_size, tmp)
    elif tokenizer_type == "bpe":
        tokenizer = build_tiny_tokenizer(corpus, vocab_size)
    else:
        raise ConfigError(f"model.tiny.tokenizer_type={tokenizer_type!r}: choose bpe or sentencepiece")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    json_files.write_json(tmp / "tiny_spec.json", spec, indent=None)
