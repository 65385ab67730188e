"""The sparse delta: file format (`format`) and operations on state dicts (`ops`)."""

from jlserve.delta.format import (
    DeltaMetadata,
    ParamChange,
    ParamSpec,
    SparseDelta,
    parse_delta,
    read_delta,
    write_delta,
)
from jlserve.delta.ops import (
    PlannedUpdate,
    density_report,
    diff_tensors,
    plan_chain,
    plan_update,
)

__all__ = [
    "DeltaMetadata",
    "ParamChange",
    "ParamSpec",
    "PlannedUpdate",
    "SparseDelta",
    "density_report",
    "diff_tensors",
    "parse_delta",
    "plan_chain",
    "plan_update",
    "read_delta",
    "write_delta",
]
