"""Run under TRITON_INTERPRET=1 (Triton reads it when Liger's kernels are imported): the tiny model's SFT loss on one
demo batch three ways, Liger's fused linear cross-entropy (model.kernels=liger), our chunked log-probabilities and
the whole logits (chunked_loss=false), with the largest gradient difference of each against the whole logits'. Prints
one JSON line. Usage: python -m helpers.liger_loss <work dir> <data.batching>"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

from gpt4llm.models.hf import prepare_tokenizer
from gpt4llm.models.response_logps import labelled_token_logps
from gpt4llm.training.datamodules import build_datamodule
from helpers.configs import compose_train, demo_overrides


def main(work: Path, batching: str) -> None:
    cfg = compose_train(demo_overrides(work, "data.batch_size=4", f"data.batching={batching}"))
    tokenizer, _ = prepare_tokenizer(cfg.model.path, cfg.model.tiny, cfg.model.tokenizer, "alpaca")
    data = build_datamodule(cfg, tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def run(way: str):
        torch.manual_seed(0)
        module = instantiate(
            cfg.task, tokenizer=tokenizer, kernels="liger" if way == "liger" else None, chunked_loss=way != "whole"
        )
        module.configure_model()
        if way == "chunked":  # the chunked path itself, whatever the batch's size
            token_logps = labelled_token_logps(module.model, batch)[0]
            loss = -token_logps.mean()
        else:
            loss, _ = module.loss(batch)
        loss.backward()
        return loss.item(), {k: p.grad for k, p in module.model.named_parameters()}

    whole, whole_grads = run("whole")
    out = {"whole": whole}
    for way in ("liger", "chunked"):
        loss, grads = run(way)
        out[way] = loss
        out[f"{way}_grad_max_diff"] = max((grads[k] - whole_grads[k]).abs().max().item() for k in grads)
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
