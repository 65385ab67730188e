"""The `jlserve` general plugin: registers the `jlserve` load format
(`jlserve.engine.loader`), keeps CPU attention off vLLM's AMX kernel
(`jlserve.engine.cpu_attention`), and fails closed when the jlserve endpoint plugin
cannot load.

vLLM only logs an endpoint plugin that fails to import or instantiate, and then serves
the base checkpoint, unguarded by jlserve and at version 0 while the state dir records
another version. This `vllm.general_plugins` entry has the same name ("jlserve"), so
`VLLM_PLUGINS=jlserve` enables both; vLLM runs it in every process, and a general
plugin's error is not caught: the server refuses to start. It imports the endpoint
plugin (and builds it) exactly as vLLM would, so whatever would break it breaks here.
"""

from __future__ import annotations

import os

ENABLE_ENV = "VLLM_PLUGINS"


def register() -> None:
    names = [n.strip() for n in os.environ.get(ENABLE_ENV, "").split(",")]
    if "jlserve" not in names:
        return
    from jlserve.engine.cpu_attention import register as register_cpu_attention
    from jlserve.engine.loader import register as register_loader

    register_loader()  # in every process: the workers are where weights are loaded
    register_cpu_attention()  # and where attention runs
    try:
        from jlserve.server.plugin import JlserveEndpointPlugin

        JlserveEndpointPlugin()
    except Exception as exc:
        raise RuntimeError(
            f"the jlserve endpoint plugin cannot load ({type(exc).__name__}: {exc}); "
            "refusing to start rather than serve without it"
        ) from exc
