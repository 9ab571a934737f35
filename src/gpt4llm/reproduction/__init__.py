"""`python -m gpt4llm.reproduce`: the paper's study as cached, resumable stages, and the report of our numbers
beside the paper's."""
