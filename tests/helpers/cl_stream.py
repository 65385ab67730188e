"""A synthetic two-task stream in the CL benchmark layout (docs/data.md), written in
milliseconds from fixed words: for trainer tests that need a run to train, without the
research benchmark or a download."""

from __future__ import annotations

import json
import random
from pathlib import Path

ORDER = "two"  # the order of tasks.json naming both tasks: colors, then moods


def write_stream(root: Path) -> Path:
    """Two tasks, `colors` and `moods`, under `root` (order `two`); returns `root`.

    Labels of different token lengths (ranks of a data-parallel run see different
    target-token counts); 33 and 30 train rows, 4 dev rows: at batch 4 the last global
    batches hold 1 and 2 examples."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "quick"]
    specs = {
        "colors": (["red", "dark blue", "light sea green"], 33),
        "moods": (["happy", "not sad at all"], 30),
    }
    tasks = {}
    for name, (options, n_train) in specs.items():
        tasks[name] = {"instruction": f"Name the {name}.", "options": options}
        (root / name).mkdir(parents=True)
        for split, n in (("train", n_train), ("dev", 4)):
            rows = [
                {
                    "sentence": " ".join(rng.choices(words, k=rng.randint(3, 14))),
                    "label": rng.choice(options),
                }
                for _ in range(n)
            ]
            (root / name / f"{split}.json").write_text(json.dumps(rows))
    (root / "tasks.json").write_text(json.dumps({"tasks": tasks, "orders": {ORDER: list(tasks)}}))
    return root
