"""Entry point: argparse tree, one module per command group, lazy imports throughout."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from stoker import __version__

TYPE_CHECKING = False  # `typing` stays off the start-up path (it costs ~4 ms to import)
if TYPE_CHECKING:
    from typing import Any, NoReturn

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse with stoker's conventions: usage errors exit 2 with the subcommand's own
    usage, and hidden helpers (`__names`, ...) never appear in a message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse sizes help with shutil.get_terminal_size, importing shutil (and zlib,
        # bz2, lzma) at the first add_argument: the same width without that import.
        return self.formatter_class(prog=self.prog, width=_help_width())  # type: ignore[call-arg]

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if (
            isinstance(action, argparse._SubParsersAction)
            and value not in action.choices
            and action.choices
        ):
            visible = ", ".join(c for c in action.choices if not str(c).startswith("__"))
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {visible})"
            )
        super()._check_value(action, value)


_WIDTH: list[int] = []


def _help_width() -> int:
    """What argparse would use: $COLUMNS, else the terminal's width, else 80; minus 2."""
    if not _WIDTH:
        try:
            cols = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            cols = 0
        if cols <= 0:
            try:
                cols = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                cols = 0
        _WIDTH.append((cols if cols > 0 else 80) - 2)
    return _WIDTH[0]


# Command group -> the module that registers it. Only the group a command line names is
# built: constructing every subparser costs more than the rest of a `stoker vm list`.
GROUPS = {
    "vm": "vm",
    "ps": "vm",
    "image": "image",
    "kernel": "kernel",
    "pool": "pool",
    "daemon": "daemon_cmd",
    "doctor": "doctor",
    "system": "system",
    "completion": "completion",
    "__names": "completion",
    "__flags": "completion",
    "ssh-config": "sshconfig",
    "__connect": "sshconfig",
    "__complete": "completion",
    "__manpage": "completion",
}


def build_parser(only: str | None = None, sub_only: str | None = None) -> argparse.ArgumentParser:
    """The argparse tree; with `only`, just that command group's module is registered (and
    with `sub_only`, just that subcommand of `vm`)."""
    import importlib

    ap = Parser(
        prog="stoker",
        description="A clean Linux microVM with your repository inside, in one command.",
    )
    ap.add_argument("--config", help="config file (default ~/.config/stoker/config.toml)")
    ap.add_argument("--system", action="store_true", help="talk to the system-wide stokerd")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="debug logging, tracebacks on errors; a daemon this command starts logs at debug",
    )
    ap.add_argument("--version", action="version", version=f"stoker {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print CLI and daemon versions")
    p.add_argument("--json", action="store_true", help="print JSON (fields: docs/json-output.md)")
    p.set_defaults(func=_version)
    wanted = GROUPS.get(only) if only else None
    for mod in dict.fromkeys(GROUPS.values()):
        if wanted is None or mod == wanted:
            module = importlib.import_module(f"stoker.cli.{mod}")
            if mod == "vm" and only == "vm":
                module.register(sub, sub_only)
            else:
                module.register(sub)
    # Helpers for completion and ssh's ProxyCommand stay out of --help.
    sub._choices_actions = [a for a in sub._choices_actions if not a.dest.startswith("__")]
    from stoker.cli.examples import document

    document(ap)
    return ap


def leaf_parser(ap: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser the positional words of `argv` lead to."""
    p = ap
    for w in _words(argv):
        nxt = None
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) and w in a.choices:
                nxt = a.choices[w]
        if nxt is None:
            break
        p = nxt
    return p


def _words(argv: list[str]) -> list[str]:
    """The positional words of a command line, up to the first help flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            break
        if a in ("--config", "--format"):
            i += 2
            continue
        if not a.startswith("-"):
            out.append(a)
        i += 1
    return out


def _group_of(argv: list[str]) -> tuple[str | None, str | None]:
    """(command group, its subcommand) named on the command line, where known."""
    words = _words(argv)
    group = words[0] if words and words[0] in GROUPS else None
    sub = words[1] if group and len(words) > 1 else None
    return group, sub


def _version(args: argparse.Namespace) -> int:
    from stoker.cli.connect import try_client
    from stoker.cli.render import print_json

    daemon_version = None
    with try_client(args) as c:
        if c is not None:
            from stoker.rpc.facade import TypedClient

            daemon_version = TypedClient(c).daemon.status()["version"]
    if args.json:
        print_json({"cli": __version__, "daemon": daemon_version})
    else:
        print(f"stoker {__version__}")
        print(f"stokerd {daemon_version or '(not running)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["__complete"]:  # the shells' TAB: raw words, no argparse of its own
        from stoker.cli.completion import complete_main

        return complete_main(argv[1:])
    # `-- CMD...` is split off before argparse, which would otherwise take CMD's first
    # word for an optional positional (`vm run -- uname -a`).
    trailing: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, trailing = argv[:i], argv[i + 1 :]
    ap = build_parser(*_group_of(argv))
    args, extra = ap.parse_known_args(argv)
    if extra:
        leaf_parser(ap, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    if trailing is not None:
        if not hasattr(args, "cmd"):
            leaf_parser(ap, argv).error(
                "`-- COMMAND` is only accepted by vm run, vm exec and vm ssh"
            )
        if not trailing:
            leaf_parser(ap, argv).error(
                "`--` must be followed by a command (leave `--` out to run none)"
            )
        args.cmd = trailing
    func: Handler | None = getattr(args, "func", None)
    leaf = leaf_parser(ap, argv)
    if func is None or any(
        isinstance(a, argparse._SubParsersAction) and getattr(args, a.dest, None) is None
        for a in leaf._actions
    ):
        leaf.print_help(sys.stderr)  # a command group without its subcommand
        return 2
    assert func is not None
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="stoker: %(name)s: %(message)s")
        # An autostarted stokerd inherits the environment: it logs at debug too.
        os.environ["STOKER_LOG_LEVEL"] = "debug"
    from stoker.cli.render import UsageError
    from stoker.errors import StokerError

    try:
        return func(args)
    except UsageError as e:
        leaf_parser(ap, argv).error(str(e))
    except StokerError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"stoker: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stoker: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
