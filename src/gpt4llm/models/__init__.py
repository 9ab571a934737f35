"""The LightningModules (SFT, reward model, DPO), Hugging Face loading, adapters, export and its model card, batched
decoding, attention."""
