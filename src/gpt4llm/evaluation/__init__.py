"""The paper's evaluations: the eval sets, ROUGE by reference length, and the GPT-4 judge."""
