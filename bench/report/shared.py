"""Shared helpers of the report's sections: number formats, the provenance line under each
heading, and saving a figure with its footer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.common import figure_footer, machine_line


def pct(x: float) -> str:
    return f"{100 * x:g} %"


def ms(s: float) -> str:
    return f"{1e3 * s:.1f}" if s < 10 else f"{1e3 * s:.0f}"


def mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def provenance(doc: dict[str, Any]) -> str:
    return (
        f"*Run {doc['created']} ({'quick' if doc['quick'] else 'full'}), "
        f"`{doc['command']}`; {machine_line(doc['machine'])}; "
        f"load average at start {doc['machine'].get('loadavg_at_start', float('nan')):.1f}.*"
    )


def save_figure(fig: Any, doc: dict[str, Any], img_dir: Path, name: str, md_dir: Path) -> str:
    figure_footer(fig, doc)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{name}]({path.relative_to(md_dir).as_posix()})"
