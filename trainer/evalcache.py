"""A folder of finished task evaluations, so runs that share a model never evaluate it twice.

An evaluation is a pure function of what goes in: the model (its fingerprint: every weight;
and the model folder's other files: config, tokenizer), the task's held-out rows (as rows,
and as the prompt and target token ids the model reads, stop token, answer budget, metric),
the evaluator (in process: device, precision, batch size; or through a server) and the code
(torch, transformers and jlserve versions). The key hashes all of these, so an entry is
reused only where the same evaluation would run again; the main use is the base row, which
every run on the same base model and tasks evaluates at its start (`python -m trainer
--eval-cache DIR`; the CL benchmark keeps one per result set). What the key cannot see is a
server's own settings (its dtype, its vLLM): use one folder per serving set-up.

One JSON file per entry, written atomically; a damaged entry is evaluated again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from jlserve import __version__ as jlserve_version
from jlserve.fsutil import atomic_write_bytes
from trainer.data import Encoder, EvalResult, Task

FORMAT = 1  # bump when what an entry means changes


class EvalCache:
    """Entries in `root`, one `<key>.json` each: {"exact", "prefix", "n", "loss"}, for
    models made from the checkpoint folder `model_dir` (its weights named by fingerprint)."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        import transformers  # only where a run keeps a cache

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
        self.context = {
            "format": FORMAT,
            "code": [torch.__version__, transformers.__version__, jlserve_version],
            "model_files": {  # the weights are the fingerprint's
                p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in files
                if p.suffix not in {".safetensors", ".bin", ".pt"}
            },
        }

    def key(self, fingerprint: str, enc: Encoder, task: Task, evaluator: str) -> str:
        """sha256 over everything an evaluation of `task` on the model `fingerprint` reads."""
        inputs = {
            **self.context,
            "model": fingerprint,
            "evaluator": evaluator,
            "task": [task.name, task.format, task.metric],
            "rows": task.dev,  # labels, references
            "prompts": enc.eval_prompts(task),  # what generation starts from
            "pairs": enc.pairs(task, task.dev),  # what the loss reads
            "answer": [enc.max_target_len(task), enc.stop_for(task)],
        }
        return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()

    def get(self, key: str) -> tuple[EvalResult, float] | None:
        try:
            entry = json.loads((self.root / f"{key}.json").read_text())
            result = EvalResult(float(entry["exact"]), float(entry["prefix"]), int(entry["n"]))
            return result, float(entry["loss"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: evaluate again

    def put(self, key: str, result: EvalResult, loss: float) -> None:
        entry: dict[str, Any] = {
            "exact": result.exact,
            "prefix": result.prefix,
            "n": result.n,
            "loss": loss,
        }
        atomic_write_bytes(self.root / f"{key}.json", json.dumps(entry).encode())
