"""jlserve.engine.cpu_attention: vLLM's CPU attention never takes its AMX kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jlserve.engine.cpu_attention import AMX_ISA, AVX512_ISA, KEEP_AMX_ENV, without_amx

# vLLM's chooser after register(), and whether this CPU has AMX tiles (bf16, block 128)
PROBE = """
import json, torch
from jlserve.engine.cpu_attention import register
register(); register()
import vllm.v1.attention.backends.cpu_attn as cpu_attn
print(json.dumps({"isa": cpu_attn._get_attn_isa(torch.bfloat16, 128, 64),
                  "fp32": cpu_attn._get_attn_isa(torch.float32, 128, 64),
                  "amx": torch.cpu._is_amx_tile_supported()}))
"""


def probe(**env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_only_the_amx_answer_changes():
    choose = without_amx(lambda dtype, block: AMX_ISA if block % 32 == 0 else "vec16")
    assert choose("bf16", 128) == AVX512_ISA
    assert choose("bf16", 16) == "vec16"


def test_vllm_chooses_the_avx512_kernel_on_this_cpu():
    """On a CPU with AMX vLLM would choose AMX for bf16; without, it already chooses vec."""
    seen = probe(**{KEEP_AMX_ENV: "0"})
    assert (seen["isa"], seen["fp32"]) == (AVX512_ISA, AVX512_ISA)


def test_the_opt_out_keeps_vllms_choice():
    seen = probe(**{KEEP_AMX_ENV: "1"})
    assert seen["isa"] == (AMX_ISA if seen["amx"] else AVX512_ISA)
