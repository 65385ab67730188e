"""jlserve.engine.cpu_attention: vLLM's CPU attention never takes its AMX kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jlserve.engine.cpu_attention import AMX_ISA, AVX512_ISA, KEEP_AMX_ENV, without_amx

# Through the `jlserve` general plugin, as vLLM loads it (twice: vLLM may), on a CPU that
# reports AMX tiles whatever this machine has (vLLM asks torch at each call). Prints the
# chooser's answers and whether the second load wrapped it again.
PROBE = """
import json, torch
torch.cpu._is_amx_tile_supported = lambda: True
import vllm.v1.attention.backends.cpu_attn as cpu_attn
from jlserve.server.guard import register
register()
first = cpu_attn._get_attn_isa
register()
print(json.dumps({"bf16": cpu_attn._get_attn_isa(torch.bfloat16, 128, 64),
                  "bf16_block16_head80": cpu_attn._get_attn_isa(torch.bfloat16, 16, 80),
                  "fp32": cpu_attn._get_attn_isa(torch.float32, 128, 64),
                  "wrapped_once": cpu_attn._get_attn_isa is first}))
"""


def probe(keep_amx: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "VLLM_PLUGINS": "jlserve", KEEP_AMX_ENV: keep_amx},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_only_the_amx_answer_changes():
    choose = without_amx(lambda dtype, block: AMX_ISA if block % 32 == 0 else "vec16")
    assert choose("bf16", 128) == AVX512_ISA
    assert choose("bf16", 16) == "vec16"


def test_the_jlserve_plugin_keeps_vllm_off_amx_attention():
    seen = probe(keep_amx="0")
    assert seen == {
        "bf16": AVX512_ISA,  # vLLM alone: AMX
        "bf16_block16_head80": "vec16",
        "fp32": AVX512_ISA,
        "wrapped_once": True,
    }


def test_the_opt_out_keeps_vllms_choice():
    assert probe(keep_amx="1")["bf16"] == AMX_ISA
