"""Loading a model's tokenizer so that its ids are the ones the model was trained with (and it has a pad token).

LLaMA ships a SentencePiece model (`tokenizer.model`), and stanford_alpaca, which the paper ran, tokenized with it
(`use_fast=False`). transformers 5 has no such path any more: `AutoTokenizer` converts the file to a `tokenizers` BPE
whose merges split runs of spaces differently (`"\\n    for"`: SentencePiece `13, 1678, 363`, the conversion
`13, 268, 1454`), which changes the ids of ~5% of Alpaca records (those with code or indentation). So where a model
directory ships `tokenizer.model`, `SentencePieceTokenizer` encodes with the `sentencepiece` library itself, in one
batched C++ call per batch, and keeps transformers' interface (special tokens, truncation, padding, tensors, save).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
from transformers.utils import cached_file

from gpt4llm.errors import ConfigError, MissingFileError
from gpt4llm.io import checksums, json_files

BACKENDS = ("auto", "sentencepiece", "tokenizers")
PAD_TOKEN = "[PAD]"  # stanford_alpaca's DEFAULT_PAD_TOKEN
SPECIAL_TOKENS_PATTERN = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"}


class SentencePieceTokenizer(SentencePieceBackend):
    """Ids exactly as `sentencepiece` gives them, with LLaMA's legacy handling of special tokens in text (each piece
    of text between special tokens is encoded on its own, as the slow LlamaTokenizer stanford_alpaca used did)."""

    def __init__(self, *args, add_bos_token: bool = True, add_eos_token: bool = False, **kwargs) -> None:
        kwargs.setdefault("special_tokens_pattern", SPECIAL_TOKENS_PATTERN[add_bos_token, add_eos_token])
        super().__init__(*args, **kwargs)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    def _encode_plus(self, text, text_pair=None, is_split_into_words=False, **kwargs):
        plain_text = text_pair is None and not is_split_into_words and self.legacy
        if plain_text and (
            isinstance(text, str) or (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text))
        ):
            ids = self.text_ids([text] if isinstance(text, str) else list(text))
            # The parent adds the special tokens, truncates, pads and makes tensors from ids as it would from text.
            return super()._encode_plus(ids[0] if isinstance(text, str) else ids, **kwargs)
        return super()._encode_plus(text, text_pair, is_split_into_words=is_split_into_words, **kwargs)

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids without BOS/EOS: special-token strings become their ids, the rest goes to SentencePiece."""
        added = sorted(self._added_tokens_encoder, key=len, reverse=True)
        pattern = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        parts = [pattern.split(t) if pattern else [t] for t in texts]  # odd positions are special tokens
        encoded = iter(self.sp_model.encode([p for ps in parts for p in ps[::2] if p]))
        return [
            [i for k, p in enumerate(ps) if p for i in ([self._added_tokens_encoder[p]] if k % 2 else next(encoded))]
            for ps in parts
        ]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # SentencePiece's own decoding: byte-fallback pieces (<0x0A>) become their bytes, "▁" spaces.
        text, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:
                text += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        return "".join([*text, self.sp_model.decode_pieces(run)])

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers drops these two on save; without them a reload would not know whether to add BOS.
        config_file = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        json_files.write_json(config_file, config, indent=2)
        return saved


def looks_local(path: str | Path) -> bool:
    """Whether `path` names a directory on this machine rather than a hub id (owner/name): it starts with /, ./, ../
    or ~, has more parts than a hub id can, or sits in a directory that exists here."""
    text = str(path)
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return True
    parts = Path(text).parts
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


# What a Hugging Face model directory holds: its config, or at least its tokenizer's files.
MODEL_DIR_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_model_dir(path: str | Path) -> None:
    """A MissingFileError for a local model directory that is not there, or that holds no model (an empty directory,
    another program's folder): transformers would take a missing path for a malformed hub id ("Repo id must be in the
    form ...") and an empty one for a tokenizer it cannot build ("Couldn't instantiate the backend tokenizer ...
    install sentencepiece")."""
    if not looks_local(path):
        return
    local = Path(path).expanduser()
    if not local.exists():
        raise MissingFileError(
            f"{path}: no such model directory. Check the path: it should be a directory with config.json "
            f"(a run's export/ directory), or a hub model's id (owner/name)"
        )
    if not local.is_dir():
        raise MissingFileError(f"{path}: a file, not a model directory: point at the directory that holds config.json")
    if not any((local / name).is_file() for name in MODEL_DIR_FILES):
        held = sorted(p.name for p in local.iterdir())
        listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "") if held else "nothing"
        raise MissingFileError(
            f"{path}: holds no model (no config.json or tokenizer files; it holds {listed}). Point at a model "
            f"directory: a run's export/ directory, or one saved with save_pretrained"
        )
    checksums.verify_manifest(local)  # an export of ours: every file as it was written


def model_file(path: str | Path, name: str) -> Path | None:
    """`name` from a local model directory or a hub id (fetched into the hub cache), None where it has none."""
    found = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def resolve_backend(path: str | Path, backend: str = "auto") -> str:
    """`auto`: SentencePiece where the model ships a SentencePiece model, transformers' `tokenizers` otherwise."""
    if backend not in BACKENDS:
        raise ConfigError(f"model.tokenizer={backend!r}: choose one of {', '.join(BACKENDS)}")
    has_model_file = model_file(path, "tokenizer.model") is not None
    if backend == "sentencepiece" and not has_model_file:
        raise MissingFileError(f"model.tokenizer=sentencepiece, but {path} has no tokenizer.model")
    if backend == "auto":
        return "sentencepiece" if has_model_file else "tokenizers"
    return backend


def load_pretrained_tokenizer(path: str | Path, backend: str = "auto", **kwargs):
    """The tokenizer of a model directory or hub id, with the backend `resolve_backend` picks."""
    check_model_dir(path)
    if resolve_backend(path, backend) == "tokenizers":
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    config_file = model_file(path, "tokenizer_config.json")
    config = json.loads(config_file.read_text()) if config_file else {}
    settings = {"add_bos_token": config.get("add_bos_token", True), "add_eos_token": config.get("add_eos_token", False)}
    if not any(config.get(name) for name in ("bos_token", "eos_token", "unk_token")):
        # A bare tokenizer.model (no config): its special tokens are the ones the SentencePiece model defines.
        import sentencepiece

        model = sentencepiece.SentencePieceProcessor(model_file=str(model_file(path, "tokenizer.model")))
        for name, index in (
            ("bos_token", model.bos_id()),
            ("eos_token", model.eos_id()),
            ("unk_token", model.unk_id()),
        ):
            if index >= 0:
                settings[name] = model.id_to_piece(index)
    return SentencePieceTokenizer.from_pretrained(str(path), **settings, **kwargs)


def describe(tokenizer) -> dict[str, str]:
    """What reports say about the tokenizer: where it came from and which library made its ids."""
    backend = "sentencepiece" if isinstance(tokenizer, SentencePieceTokenizer) else "tokenizers"
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "backend": backend, "class": type(tokenizer).__name__}


def load_tokenizer(path: str, padding_side: str = "right", backend: str = "auto"):
    """The model's tokenizer (SentencePiece's ids where it ships tokenizer.model: gpt4llm.data.tokenizer) with a pad
    token; LLaMA has none, so one is added as stanford_alpaca did."""
    tokenizer = load_pretrained_tokenizer(path, backend, padding_side=padding_side)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.eos_token is None:
        raise ConfigError(f"{path}: the tokenizer has no EOS token; SFT targets end with it, so it must exist")
    return tokenizer
