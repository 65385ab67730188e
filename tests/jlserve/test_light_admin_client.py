"""`jlserve update|status|rollback` import neither torch nor vLLM: the CLI's start is most
of the user-visible time of a swap that itself takes tens of milliseconds."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "vllm", "safetensors", "numpy", "transformers")

PROBE = """
import sys
from jlserve.cli import main
import jlserve.client, jlserve.store, jlserve.faults, jlserve.server.schemas
for command in ("update", "status", "rollback"):
    try:
        main([command, "--help"])
    except SystemExit:
        pass
print("heavy modules:", sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_admin_commands_import_no_torch_and_no_vllm():
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "heavy modules: []"


def test_the_delta_child_is_read_without_torch(tmp_path):
    import torch

    from jlserve.client import delta_child_fingerprint
    from jlserve.delta import diff_tensors

    delta = diff_tensors({"w": torch.zeros(3)}, {"w": torch.ones(3)}, task="t")
    assert delta_child_fingerprint(delta.to_bytes()) == delta.metadata.child_fingerprint
    assert delta_child_fingerprint(b"not a delta") is None
