"""Records, prompts, tokenization, batching and the LightningDataModules: everything between a data file and a batch."""
