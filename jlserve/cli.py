"""The `jlserve` command line: one sub-command group per concern.

Sub-commands register themselves with `register(subparsers)`; each parser sets
`func(args) -> int`. Commands from other installed packages (the trainer's
`jlserve train`) arrive through the `jlserve.commands` entry-point group, so this
package never imports them; they are loaded only when a built-in command was not asked
for, so `jlserve update|status|rollback` import neither torch nor vLLM. A
`JlserveError` becomes one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from jlserve import __version__
from jlserve.commands import admin_cmd, delta_cmd, model_cmd, serve_cmd
from jlserve.errors import JlserveError

BUILTIN_COMMANDS = (model_cmd, delta_cmd, serve_cmd, admin_cmd)
PLUGIN_GROUP = "jlserve.commands"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; plug-in commands are left out when `argv` names a built-in command."""
    parser = argparse.ArgumentParser(prog="jlserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jlserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in BUILTIN_COMMANDS:
        module.register(subparsers)
    if argv is not None and argv and argv[0] in subparsers.choices:
        return parser
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            register = entry_point.load()
        except ImportError as exc:  # a broken plug-in must not take the other commands down
            print(
                f"jlserve: warning: command {entry_point.name!r} unavailable ({exc})",
                file=sys.stderr,
            )
            continue
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JlserveError as exc:
        print(f"jlserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jlserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
