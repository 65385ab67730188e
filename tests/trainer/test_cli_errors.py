"""Bad trainer inputs through the command line: one clear line on stderr, exit code 2,
no traceback, no run directory. Malformed YAML, unknown keys, missing data files, an empty
or malformed tasks.json, unknown task names, an empty task list and a task without rows, a
model directory without a tokenizer, a `chat` prompt format for a tokenizer without a
usable chat template, an absent device. (docs/trainer.md lists the cases; the ones not
here are in test_loop.py's BAD_INPUTS.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.cli import main as trainer_main

CASES = {
    "malformed-yaml": ("model: [unclosed\n", "not valid YAML"),
    "unknown-key": ("model: {model}\nbogus: 1\ndata: {{root: {data}, tasks: [cb]}}\n", "bogus"),
    "unknown-nested-key": (
        "model: {model}\ndata: {{root: {data}, tasks: [cb], shuffle: true}}\n",
        "data.shuffle",
    ),
    "missing-data-dir": (
        "model: {model}\ndata: {{root: {data}/nowhere, tasks: [cb]}}\n",
        "no tasks.json there; get the benchmark with `jlserve data cl-benchmark",
    ),
    "missing-task-file": (
        "model: {model}\ndata: {{root: {data}, tasks: [nofiles]}}\n",
        "nofiles/train.json: cannot read",
    ),
    "unknown-task": ("model: {model}\ndata: {{root: {data}, tasks: [nope]}}\n", "'nope'"),
    "empty-tasks": ("model: {model}\ndata: {{root: {data}, tasks: []}}\n", "data.tasks"),
    "task-without-rows": ("model: {model}\ndata: {{root: {data}, tasks: [empty]}}\n", "no rows"),
    "missing-config": (None, "cannot read config"),
    "empty-tasks-json": (
        "model: {model}\ndata: {{root: {empty_index}, tasks: [cb]}}\n",
        "tasks.json: not valid JSON",
    ),
    "malformed-tasks-json": (
        "model: {model}\ndata: {{root: {malformed_index}, tasks: [cb]}}\n",
        "tasks.json: not valid JSON",
    ),
    "missing-tokenizer": (
        "model: {no_tokenizer}\ndata: {{root: {data}, tasks: [cb]}}\n",
        "cannot load the tokenizer",
    ),
    "chat-without-template": (
        "model: {no_chat_template}\ndata: {{root: {data}, tasks: [cb], prompt_format: chat}}\n",
        "the tokenizer has no chat template; use plain",
    ),
    "chat-template-without-stop": (
        "model: {chat_without_stop}\ndata: {{root: {data}, tasks: [cb], prompt_format: chat}}\n",
        "no special token to stop at; use plain",
    ),
    # cuda:<number of GPUs here>: absent on any machine (cuda:0 where there is no GPU). On a
    # GPU machine the trainer does not check the index (read, not run): expect a failure.
    "absent-cuda-device": (
        "model: {model}\ndata: {{root: {data}, tasks: [cb]}}\ntrain: {{device: '{absent_cuda}'}}\n",
        "CUDA is not available here",
    ),
    "absent-device-type": (  # a device type PyTorch knows, absent from this build (Linux)
        "model: {model}\ndata: {{root: {data}, tasks: [cb]}}\ntrain: {{device: mps}}\n",
        "train.device",
    ),
}
# A chat template that renders, but ends the assistant's turn with plain text: no token to
# stop generation at.
TEMPLATE_WITHOUT_STOP = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A CL-benchmark-shaped data dir: one good task, one with empty files, one without."""
    root = tmp_path_factory.mktemp("cl-data")
    tasks = {name: {"instruction": "x", "options": ["a", "b"]} for name in ("cb", "empty")}
    tasks["nofiles"] = {"instruction": "x", "options": ["a"]}
    (root / "tasks.json").write_text(json.dumps({"tasks": tasks, "orders": {"o": ["cb"]}}))
    for name, rows in (("cb", [{"sentence": "s", "label": "a"}]), ("empty", [])):
        (root / name).mkdir()
        for split in ("train", "dev"):
            (root / name / f"{split}.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, data_root) -> dict[str, Path | str]:
    """What the templates name: the tiny model and copies of it lacking a tokenizer or a
    usable chat template, the data root and copies of it with a broken tasks.json."""
    root = tmp_path_factory.mktemp("bad-inputs")
    paths: dict[str, Path | str] = {"model": tiny_model_dir, "data": data_root}
    paths["no_tokenizer"] = root / "no-tokenizer"  # weights and model config only
    paths["no_tokenizer"].mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, paths["no_tokenizer"] / name)
    paths["no_chat_template"] = shutil.copytree(tiny_model_dir, root / "no-chat-template")
    (paths["no_chat_template"] / "chat_template.jinja").unlink()
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # the template lives in chat_template.jinja only
    paths["chat_without_stop"] = shutil.copytree(tiny_model_dir, root / "chat-without-stop")
    (paths["chat_without_stop"] / "chat_template.jinja").write_text(TEMPLATE_WITHOUT_STOP)
    for key, text in (("empty_index", ""), ("malformed_index", '{"tasks": {"cb": ')):
        paths[key] = shutil.copytree(data_root, root / key)
        (paths[key] / "tasks.json").write_text(text)
    paths["absent_cuda"] = f"cuda:{torch.cuda.device_count()}"
    return paths


def write_config(tmp_path: Path, case: str, inputs: dict[str, Path | str]) -> Path:
    path = tmp_path / f"{case}.yaml"
    template, _ = CASES[case]
    if template is not None:
        path.write_text(template.format(**inputs))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, inputs, case, capsys):
    config = write_config(tmp_path, case, inputs)
    out = tmp_path / "run"
    assert trainer_main(["--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error: "), err
    assert CASES[case][1] in err[0]
    assert not out.exists()  # the run directory is created only after every check


def test_jlserve_train_reports_the_same_way(tmp_path, inputs):
    """The installed `jlserve train` entry point, in a real process."""
    config = write_config(tmp_path, "unknown-task", inputs)
    done = subprocess.run(
        [sys.executable, "-m", "jlserve", "train", "--config", str(config), "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("jlserve: error: task 'nope'")
