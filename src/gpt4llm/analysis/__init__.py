"""What the instruction data says (`python -m gpt4llm.analyze`): the verb–noun structure of its texts and their
lengths (the paper's Figure 1)."""
