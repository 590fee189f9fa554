"""`stoker completion bash|zsh|fish`: shell completion that follows the real parser.

Each shell's script is a thin shim: on TAB it runs the hidden `stoker __complete SHELL CWORD
WORDS...`, which walks the command line through the same argparse tree `stoker` parses with
(built lazily, only the group the line names) and answers with a directive line and the
candidates:

    @words   the candidates follow, one a line (already filtered by the word being completed)
    @files   let the shell complete file names (and directories) itself
    @dirs    let the shell complete directory names itself

Subcommands and flags come from the parser; the values of a flag or positional come from its
`choices`, or from the table below: live VM/image/kernel names (asked of the daemon with a
short timeout, only if it already runs: completion never starts it), files or directories.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# Where a positional NAME does not name an existing object (it creates one, or names a
# catalog entry): no live names there.
_NEW_NAME = {"image register", "image pull", "image build", "kernel import", "kernel pull"}

# Values of arguments by dest, wherever they appear.
_BY_DEST = {
    "image": "image",
    "kernel": "kernel",
    "config": "file",
    "rootfs": "file",
    "work_seed": "file",
    "output": "file",
    "source": "file",  # a directory or a .deb: the shell's file completion offers both
    "path": "dir",
}
_GROUP_KIND = {"vm": "vm", "ps": "vm", "image": "image", "kernel": "kernel"}


def _value_kind(path: str, action: argparse.Action) -> str | None:
    """What completes the value of `action` in the command `path` (e.g. "vm show")."""
    explicit = getattr(action, "completer", None)
    if explicit:
        return str(explicit)
    if action.dest == "format":
        return "fields"
    if action.dest in ("name", "names") and not action.option_strings:
        if path in _NEW_NAME:
            return None
        return _GROUP_KIND.get(path.split(" ", 1)[0])
    return _BY_DEST.get(action.dest)


def _live_names(kind: str, system: bool) -> list[str]:
    """Names from a daemon that already runs; nothing (fast) when it does not."""
    from stoker.layout import Layout
    from stoker.rpc.client import Client

    method = {"vm": "vm.list", "image": "image.list", "kernel": "kernel.list"}[kind]
    try:
        with Client(Layout.resolve(system=system).socket_path, timeout=0.5) as c:
            return [str(i["name"]) for i in c.call(method)]
    except Exception:
        return []


def _join_equals(toks: list[str]) -> list[str]:
    """bash splits `--opt=value` at `=` (COMP_WORDBREAKS): glue it back."""
    out: list[str] = []
    glue = False
    for t in toks:
        if t == "=" and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] += "="
            glue = True
        elif glue:
            out[-1] += t
            glue = False
        else:
            out.append(t)
    return out


def complete(shell: str, cword: int, words: list[str]) -> tuple[str, list[str]]:
    """(directive, candidates) for the word at index `cword` of `words` (words[0] is
    `stoker`)."""
    from stoker.cli.main import _group_of, build_parser

    toks = list(words[1 : cword + 1])
    while len(toks) < cword:
        toks.append("")
    if not toks:
        toks = [""]
    if shell == "bash":
        toks = _join_equals(toks)
    cur, before = toks[-1], toks[:-1]
    ap = build_parser(*_group_of([t for t in before if t != "--"]))

    p: argparse.ArgumentParser = ap
    npos = 0
    pending: argparse.Action | None = None
    after_dashdash = False
    system = False
    for tok in before:
        if pending is not None:
            pending = None
            continue
        if tok == "--":
            after_dashdash = True
            break
        if tok.startswith("-") and len(tok) > 1:
            system = system or tok == "--system"
            opt = tok.split("=", 1)[0]
            action = p._option_string_actions.get(opt)
            if action is not None and action.nargs != 0 and "=" not in tok:
                pending = action
            continue
        positionals = p._get_positional_actions()
        if npos < len(positionals):
            a = positionals[npos]
            if isinstance(a, argparse._SubParsersAction):
                if tok in a.choices:
                    p, npos = a.choices[tok], 0
                    continue
                break  # an unknown command: nothing sensible to offer
            if a.nargs not in ("*", "+", argparse.REMAINDER):
                npos += 1
    path = p.prog.removeprefix("stoker").strip()

    if after_dashdash:
        return "@files", []
    prefix = ""
    if pending is None and cur.startswith("--") and "=" in cur:
        opt, value = cur.split("=", 1)
        pending = p._option_string_actions.get(opt)
        if pending is None or pending.nargs == 0:
            return "@words", []
        prefix = "" if shell == "bash" else opt + "="
        cur = value
    if pending is not None:
        return _values(path, pending, cur, prefix, system, p)
    if cur.startswith("-"):
        flags = [
            s
            for a in p._actions
            if a.help != argparse.SUPPRESS
            for s in a.option_strings
            if s.startswith(cur)
        ]
        return "@words", sorted(flags, key=lambda s: (s.startswith("--"), s))
    positionals = p._get_positional_actions()
    if npos < len(positionals):
        a = positionals[npos]
        if isinstance(a, argparse._SubParsersAction):
            subs = [c for c in a.choices if not c.startswith("__") and c.startswith(cur)]
            return "@words", subs
        return _values(path, a, cur, "", system, p)
    return "@words", []


def _values(
    path: str,
    action: argparse.Action,
    cur: str,
    prefix: str,
    system: bool,
    p: argparse.ArgumentParser,
) -> tuple[str, list[str]]:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return "@words", [prefix + str(c) for c in action.choices if str(c).startswith(cur)]
    kind = _value_kind(path, action)
    if kind == "file":
        return "@files", []
    if kind == "dir":
        return "@dirs", []
    if kind == "fields":
        from stoker.cli.render import FIELDS

        fields = FIELDS.get(str(p.get_default("output_kind") or ""), ())
        return "@words", [prefix + f for f in fields if f.startswith(cur)]
    if kind in ("vm", "image", "kernel"):
        return "@words", [prefix + n for n in _live_names(kind, system) if n.startswith(cur)]
    return "@words", []


def complete_main(argv: list[str]) -> int:
    """`stoker __complete SHELL CWORD WORDS...` (called by the shell scripts)."""
    try:
        shell, cword, words = argv[0], int(argv[1]), argv[2:]
        directive, cands = complete(shell, cword, words)
    except Exception:
        return 1  # never a traceback in the middle of someone's command line
    sys.stdout.write("\n".join([directive, *cands]) + "\n")
    return 0


_BASH = r"""# stoker bash completion: `source <(stoker completion bash)`, or save it as
# ~/.local/share/bash-completion/completions/stoker
_stoker() {
    local IFS=$'\n' cur="${COMP_WORDS[COMP_CWORD]}"
    local -a out
    out=($(command stoker __complete bash "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null))
    [[ "$cur" == "=" ]] && cur=""
    case "${out[0]}" in
        @files) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
        @dirs) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;
        @words) COMPREPLY=("${out[@]:1}") ;;
        *) COMPREPLY=() ;;
    esac
}
complete -F _stoker stoker
"""

_ZSH = r"""#compdef stoker
# stoker zsh completion: save as _stoker in a directory on $fpath (before compinit), or
# `source <(stoker completion zsh)` after compinit.
_stoker() {
    local -a out
    out=("${(@f)$(command stoker __complete zsh $((CURRENT - 1)) "${words[@]}" 2>/dev/null)}")
    case "${out[1]}" in
        @files) _files ;;
        @dirs) _files -/ ;;
        @words) (( ${#out} > 1 )) && compadd -- "${(@)out[2,-1]}" ;;
    esac
}
if [[ "${funcstack[1]}" == "_stoker" ]]; then
    _stoker "$@"
else
    compdef _stoker stoker
fi
"""

_FISH = r"""# stoker fish completion: save as ~/.config/fish/completions/stoker.fish
function __stoker_complete
    set -l tokens (commandline -opc)
    set -l cur (commandline -ct)
    set -l out (command stoker __complete fish (count $tokens) $tokens $cur 2>/dev/null)
    switch "$out[1]"
        case @files
            __fish_complete_path $cur
        case @dirs
            __fish_complete_directories $cur
        case @words
            printf '%s\n' $out[2..-1]
    end
end
complete -c stoker -f -a '(__stoker_complete)'
"""


def script(shell: str) -> str:
    return {"bash": _BASH, "zsh": _ZSH, "fish": _FISH}[shell]


def register(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash", "zsh", "fish"])
    p.set_defaults(func=lambda a: (sys.stdout.write(script(a.shell)), 0)[1])
    n = sub.add_parser("__names")  # hidden helper: live names, never starts the daemon
    n.add_argument("kind", choices=["vm", "image", "kernel"])
    n.set_defaults(func=_names)
    m = sub.add_parser("__manpage")  # hidden: write stoker.1 from the parser
    m.add_argument("-o", "--output", help="write here instead of stdout")
    m.set_defaults(func=_manpage)


def _names(args: argparse.Namespace) -> int:
    names = _live_names(args.kind, getattr(args, "system", False))
    if names:
        print("\n".join(names))
    return 0


def _manpage(args: argparse.Namespace) -> int:
    from stoker.cli.manpage import render

    text = render()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
