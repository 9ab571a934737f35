"""A trained reward model export, loaded once, scoring (prompt, response) pairs as its training built them: the one
scoring path of `gpt4llm.score`, best-of-N, `evaluate metric=reward` and the online-RL reward (`reward=model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt4llm.models import model_card


class RewardModelScorer:
    """`model_dir`: a `task=rm` export (its tokenizer, template and max_length recorded in it). Scores records whose
    prompt is `prompt`, or `instruction` and optional `input`, with responses given apart: the same prompt can be
    scored with many responses (best-of-N, RL groups) without copying it."""

    def __init__(self, model_dir: str | Path, device: torch.device | str | None = None, batch_size: int = 8) -> None:
        from gpt4llm.data.tokenizer import load_tokenizer
        from gpt4llm.models.reward_module import load_reward_model

        self.model_dir, self.batch_size = str(model_dir), batch_size
        self.tokenizer = load_tokenizer(self.model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_reward_model(self.model_dir, self.tokenizer).to(device).eval().requires_grad_(False)
        card = model_card.read(self.model.config)
        self.format = model_card.prompt_format_of(self.model, self.tokenizer).format  # as its training rendered them
        self.max_length = card.reward_max_length or self.model.config.max_position_embeddings

    def statistics(self) -> tuple[float, float] | None:
        """The validation reward mean and std that `train task=rm` recorded in the export's card (None: none)."""
        card = model_card.read(self.model.config)
        return (card.reward_mean, card.reward_std) if card.reward_mean is not None and card.reward_std else None

    @torch.no_grad()
    def __call__(self, records: list[dict], responses: list[str]) -> list[float]:
        """One reward per (record, response), in input order, read at the last token (sequences that fit together
        batched, of similar lengths so that little is padding)."""
        from gpt4llm.data.encoding import padded_batch
        from gpt4llm.models.reward_module import sequence_rewards

        prompts = [self.format.score_prompt(r) for r in records]
        ids = self.format.reward_ids(self.tokenizer, prompts, list(responses), self.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rewards = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = padded_batch([ids[i] for i in rows], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            for i, reward in zip(rows, sequence_rewards(self.model, **batch).tolist()):
                rewards[i] = reward
        return rewards
