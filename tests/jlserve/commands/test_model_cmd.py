"""`jlserve model prepare`: the tiny model from the CLI (SmolLM2 is covered in models/)."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from jlserve.checkpoint import fingerprint_dir
from jlserve.cli import main


def test_prepare_tiny_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["model", "prepare", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    out = capsys.readouterr().out
    assert fingerprint_dir(tmp_path / "tiny") in out
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["head_dim"] >= 32  # vLLM's CPU attention needs it
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in prompt
    assert (
        tokenizer.decode(tokenizer("Any text, even ünïcode!")["input_ids"])
        == "Any text, even ünïcode!"
    )


def test_prepare_refuses_an_existing_directory(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["model", "prepare", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
