"""The Hydra configs, shipped in the wheel as the package gpt4llm.conf (see pyproject.toml: package-dir)."""
