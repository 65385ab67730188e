"""Test-only fault injection: crash or fail a swap at a named step, to prove recovery.

Off unless the environment variable `JLSERVE_FAULT_INJECT` is set; production servers
never set it, and then every `fault_point` is one dictionary lookup. Tests start a server
with, for example,

    JLSERVE_FAULT_INJECT=mid_apply:raise,state_write:enospc

Steps (in the order a swap reaches them; see `SwapCoordinator._swap`):

    before_apply   API server: requests held, engine paused, no weight sent yet
    mid_apply      worker: half of the new tensors handed to vLLM's loader, half not
    state_write    API server: engine holds the new weights, state.json not yet written
    after_commit   API server: state.json written and the new version adopted; the
                   engine is still paused and held requests not yet released
    plugin_import  API server startup: the endpoint plugin module is being imported (a
                   failure here is what a broken install looks like to vLLM)
    restore_apply  API server: a swap failed and the previous tensors are about to be
                   loaded back (a failure here leaves the engine's weights unknown)

Actions:

    kill     SIGKILL this process (a crash: no cleanup, no finally blocks)
    raise    an `InjectedFault` (reported like any engine failure)
    enospc   OSError(ENOSPC), as a full disk would raise
    hang     block for HANG_S seconds, as a stuck engine would (use it in the worker:
             `mid_apply`; the API server's engine-call timeout must fire first)

Each armed fault fires once per process, the first time its step is reached, so a
server can recover from it (the restore after a failed apply reaches `mid_apply` again).
Every firing is written to stderr first, so tests can see which step was hit.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Mapping
from enum import StrEnum

from jlserve.errors import EngineUpdateError, ServeConfigError

FAULT_ENV = "JLSERVE_FAULT_INJECT"
HANG_S = 120.0


class FaultStep(StrEnum):
    BEFORE_APPLY = "before_apply"
    MID_APPLY = "mid_apply"
    STATE_WRITE = "state_write"
    AFTER_COMMIT = "after_commit"
    RESTORE_APPLY = "restore_apply"
    PLUGIN_IMPORT = "plugin_import"


class FaultAction(StrEnum):
    KILL = "kill"
    RAISE = "raise"
    ENOSPC = "enospc"
    HANG = "hang"


class InjectedFault(EngineUpdateError):
    """A failure caused on purpose by `JLSERVE_FAULT_INJECT`; handled like a real one."""


_fired: set[FaultStep] = set()


def armed_faults(env: Mapping[str, str] = os.environ) -> dict[FaultStep, FaultAction]:
    """The faults `env` arms; a malformed spec is refused so a typo never tests nothing."""
    spec = env.get(FAULT_ENV, "").strip()
    faults: dict[FaultStep, FaultAction] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        step, _, action = item.partition(":")
        try:
            faults[FaultStep(step)] = FaultAction(action)
        except ValueError:
            raise ServeConfigError(
                f"{FAULT_ENV}: {item!r} is not STEP:ACTION with STEP one of "
                f"{[s.value for s in FaultStep]} and ACTION one of {[a.value for a in FaultAction]}"
            ) from None
    return faults


def fault_point(step: FaultStep) -> None:
    """Fire the fault armed for `step`, if any (at most once per process)."""
    if FAULT_ENV not in os.environ or step in _fired:
        return
    action = armed_faults().get(step)
    if action is None:
        return
    _fired.add(step)
    print(f"jlserve: fault injection: {step}:{action} (pid {os.getpid()})", file=sys.stderr)
    sys.stderr.flush()
    if action is FaultAction.KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    if action is FaultAction.HANG:
        time.sleep(HANG_S)
        return
    if action is FaultAction.ENOSPC:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {step})")
    raise InjectedFault(f"injected fault at {step}")
