"""stoker(1), generated from the argparse tree: `stoker __manpage -o stoker.1`.

Every command, its usage, its flags with their help and its examples come from the parser
the CLI really uses (and cli/examples.py), so the page cannot drift from `--help`.
"""

from __future__ import annotations

import argparse
import datetime
import re

from stoker import __version__


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln[:1] in (".", "'") else ln) for ln in text.splitlines())


def _usage(p: argparse.ArgumentParser) -> str:
    u = p.format_usage().strip()
    u = re.sub(r"^usage:\s*", "", u)
    return " ".join(u.split())


def _commands(ap: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every visible (sub)parser, depth first in definition order, aliases once."""
    out: list[argparse.ArgumentParser] = []
    seen: set[int] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, c in a.choices.items():
                    if name.startswith("__") or id(c) in seen:
                        continue
                    seen.add(id(c))
                    out.append(c)
                    walk(c)

    walk(ap)
    return out


def _help_of(p: argparse.ArgumentParser, parent: argparse.ArgumentParser | None) -> str:
    for a in parent._actions if parent else []:
        if isinstance(a, argparse._SubParsersAction):
            for ca in a._choices_actions:
                if a.choices.get(ca.dest) is p:
                    return ca.help or ""
    return ""


def _options(p: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._SubParsersAction):
            continue
        if a.option_strings:
            metavar = ""
            if a.nargs != 0:
                metavar = " " + (a.metavar if isinstance(a.metavar, str) else (a.dest.upper()))
            label = ", ".join(f"\\fB{_esc(s)}\\fR" for s in a.option_strings)
            label += _esc(metavar)
        else:
            label = f"\\fI{_esc(a.metavar if isinstance(a.metavar, str) else a.dest.upper())}\\fR"
        help_text = (a.help or "") % {"default": a.default, "prog": p.prog}
        if a.choices is not None:
            help_text += f" (one of: {', '.join(map(str, a.choices))})"
        lines += [".TP", label, _esc(help_text)]
    return lines


def render() -> str:
    from stoker.cli.main import build_parser

    ap = build_parser()
    date = datetime.date.today().isoformat()
    out = [
        f'.TH STOKER 1 "{date}" "stoker {__version__}" "User Commands"',
        ".SH NAME",
        "stoker \\- a clean Linux microVM with your repository inside, in one command",
        ".SH SYNOPSIS",
        f".B {_esc(_usage(ap))}",
        ".SH DESCRIPTION",
        _esc(ap.description or ""),
        "Commands talk to the stokerd daemon over a Unix socket; a per-user daemon is started "
        "on first use (not with \\fB\\-\\-system\\fR).",
        ".SH GLOBAL OPTIONS",
        *_options(ap),
        ".SH COMMANDS",
    ]
    parents: dict[int, argparse.ArgumentParser] = {}
    for p in [ap, *_commands(ap)]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for c in a.choices.values():
                    parents.setdefault(id(c), p)
    for p in _commands(ap):
        out += [f".SS {_esc(p.prog)}", _esc(_help_of(p, parents.get(id(p))))]
        aliases = _aliases(p, parents.get(id(p)))
        if aliases:
            out += [".br", _esc(f"alias: {', '.join(aliases)}")]
        out += [".PP", f".B {_esc(_usage(p))}"]
        if p.description:
            out += [".PP", _esc(p.description)]
        out += _options(p)
        if p.epilog:
            out += [".PP", "Examples:", ".nf", ".RS"]
            out += [_esc(ln.strip()) for ln in p.epilog.splitlines()[1:]]
            out += [".RE", ".fi"]
    out += [
        ".SH EXIT STATUS",
        "0 on success; 1 when stoker or the daemon failed (the message names what and what "
        "to do); 2 for a usage error (the subcommand's usage is printed); 130 when "
        "interrupted.",
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBSTOKER_CONFIG\\fR",
        "config file (like \\fB\\-\\-config\\fR)",
        ".TP",
        "\\fBSTOKER_LOG_LEVEL\\fR",
        "log level of a daemon the CLI starts (\\fB\\-\\-debug\\fR sets it to debug)",
        ".TP",
        "\\fBTERM\\fR",
        "with TERM=dumb, or when stderr is not a terminal, progress is printed as plain "
        "lines without escape sequences",
        ".SH FILES",
        ".TP",
        "\\fI~/.config/stoker/config.toml\\fR",
        "per-user config (\\fI/etc/stoker/config.toml\\fR with \\fB\\-\\-system\\fR)",
        ".SH SEE ALSO",
        "\\fBstokerd\\fR(8), \\fBssh\\fR(1); JSON output fields: docs/json-output.md",
    ]
    return "\n".join(out) + "\n"


def _aliases(p: argparse.ArgumentParser, parent: argparse.ArgumentParser | None) -> list[str]:
    if parent is None:
        return []
    name = p.prog.rsplit(" ", 1)[-1]
    for a in parent._actions:
        if isinstance(a, argparse._SubParsersAction):
            return [n for n, c in a.choices.items() if c is p and n != name]
    return []
