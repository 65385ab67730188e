"""The inference engine boundary: the only package that talks to vLLM.

`protocol` is what the swap coordinator needs (no vLLM import); `vllm_engine` adapts a
running `AsyncLLM`; `worker` runs inside vLLM's workers; `launch` starts vLLM's server.
"""
