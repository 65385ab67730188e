"""Test mode: make vLLM's CPU backend keep dense linear weights, as on GPU.

On CPU, vLLM repacks every linear weight for oneDNN (or the SGL AMX kernel) after loading
and leaves `layer.weight` empty, so only the reload path can change weights. To test the
in-place path that GPUs use on a CPU-only machine, this `vllm.general_plugins` entry
makes vLLM take its own fallback (`torch.nn.functional.linear` on the dense parameter).
It runs in every vLLM process but does nothing unless `JLSERVE_CPU_DENSE_WEIGHTS=1`
(set by `jlserve serve --cpu-dense-weights`), so plain vLLM in the same environment is
unaffected. It is slower than the repacked kernels: a test and diagnosis tool only.
"""

from __future__ import annotations

import os

ENV_FLAG = "JLSERVE_CPU_DENSE_WEIGHTS"
PLUGIN_NAME = "jlserve_cpu_dense"


def register() -> None:
    if os.environ.get(ENV_FLAG) != "1":
        return
    import vllm._custom_ops as ops
    import vllm.model_executor.layers.utils as layer_utils

    ops._supports_onednn = False
    layer_utils.check_cpu_sgl_kernel = lambda n, k, dtype: False
