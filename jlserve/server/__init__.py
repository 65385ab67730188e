"""jlserve's side of the HTTP server: admin routes, swap coordinator, version middleware.

Loaded into vLLM's own OpenAI server by `plugin.JlserveEndpointPlugin`.
"""
