"""The LightningModules for SFT and reward models, Hugging Face loading and export, tokenizers, attention."""
