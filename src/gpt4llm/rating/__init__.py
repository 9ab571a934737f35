"""Blind pairwise human evaluation (`python -m gpt4llm.humaneval`): the study, its vote store, the rating web app
and the report."""
