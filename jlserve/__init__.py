"""jlserve: serve a continually-learning LLM and hot-swap sparse per-task deltas into it."""

__version__ = "0.1.0"
