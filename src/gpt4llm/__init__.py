"""gpt4llm: instruction tuning with GPT-4 data on Lightning + Hydra."""

__version__ = "0.1.0"
