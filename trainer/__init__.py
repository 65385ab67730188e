"""The JumpLoRA continual-learning trainer: adapters, CL methods, task loop, deltas, reports."""
