"""Training machinery around the LightningModules: strategies, hardware and launch checks, callbacks, numeric
health, FLOPs and the memory plan."""
