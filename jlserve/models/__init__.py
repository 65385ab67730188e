"""Model checkpoints jlserve can build offline: the SmolLM2 default and tiny test models."""
