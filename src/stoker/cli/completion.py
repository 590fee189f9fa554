"""`stoker completion bash|zsh|fish`: shell completion with live VM/image/kernel names.

Names come from the hidden `stoker __names KIND`, which never starts the daemon and
prints nothing when it is down.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_BASH = r"""# stoker bash completion
_stoker() {
    local cur prev words cword
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    local group="${COMP_WORDS[1]}"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=( $(compgen -W "__TOP__" -- "$cur") ); return
    fi
    if [[ "$cur" == -* ]]; then
        local flags
        flags="$(stoker __flags "${COMP_WORDS[@]:1:2}" 2>/dev/null)"
        COMPREPLY=( $(compgen -W "$flags" -- "$cur") ); return
    fi
    if [[ $COMP_CWORD -eq 2 ]]; then
        case "$group" in
__GROUPS__
        esac
        COMPREPLY=( $(compgen -W "$subs" -- "$cur") ); return
    fi
    case "$group" in
        vm|ps) COMPREPLY=( $(compgen -W "$(stoker __names vm 2>/dev/null)" -- "$cur") ) ;;
        image) COMPREPLY=( $(compgen -W "$(stoker __names image 2>/dev/null)" -- "$cur") ) ;;
        kernel) COMPREPLY=( $(compgen -W "$(stoker __names kernel 2>/dev/null)" -- "$cur") ) ;;
    esac
}
complete -o default -F _stoker stoker
"""

_ZSH = r"""#compdef stoker
# stoker zsh completion (uses bash completion emulation)
autoload -U +X bashcompinit && bashcompinit
__BASH__
"""

_FISH = r"""# stoker fish completion
complete -c stoker -f
__FISH__
"""


def _tree() -> dict[str, list[str]]:
    from stoker.cli.main import build_parser

    ap = build_parser()
    out: dict[str, list[str]] = {}
    for action in ap._subparsers._group_actions:  # type: ignore[union-attr]
        assert isinstance(action, argparse._SubParsersAction)
        for name, p in action.choices.items():
            subs: list[str] = []
            for a in p._actions:
                if isinstance(a, argparse._SubParsersAction):
                    subs.extend(a.choices)
            out[name] = subs
    return out


def script(shell: str) -> str:
    tree = _tree()
    top = " ".join(sorted(k for k in tree if not k.startswith("__")))
    if shell in ("bash", "zsh"):
        groups = "\n".join(
            f'            {g}) subs="{" ".join(s)}" ;;' for g, s in sorted(tree.items()) if s
        )
        groups += '\n            *) subs="" ;;'
        bash = _BASH.replace("__TOP__", top).replace("__GROUPS__", groups)
        return bash if shell == "bash" else _ZSH.replace("__BASH__", bash)
    lines = [f"complete -c stoker -n '__fish_use_subcommand' -a '{top}'"]
    for g, subs in sorted(tree.items()):
        if subs:
            lines.append(
                f"complete -c stoker -n '__fish_seen_subcommand_from {g}; and not "
                f"__fish_seen_subcommand_from {' '.join(subs)}' -a '{' '.join(subs)}'"
            )
    for kind in ("vm", "image", "kernel"):
        lines.append(
            f"complete -c stoker -n '__fish_seen_subcommand_from {kind}; and "
            f"test (count (commandline -opc)) -ge 3' -a '(stoker __names {kind} 2>/dev/null)'"
        )
    return _FISH.replace("__FISH__", "\n".join(lines))


def register(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash", "zsh", "fish"])
    p.set_defaults(func=lambda a: (sys.stdout.write(script(a.shell)), 0)[1])
    n = sub.add_parser("__names")  # hidden helper for completion
    n.add_argument("kind", choices=["vm", "image", "kernel"])
    n.set_defaults(func=_names)
    f = sub.add_parser("__flags")
    f.add_argument("words", nargs="*")
    f.set_defaults(func=_flags)


def _names(args: argparse.Namespace) -> int:
    from stoker.cli.connect import try_client

    method = {"vm": "vm.list", "image": "image.list", "kernel": "kernel.list"}[args.kind]
    with try_client(args) as c:
        if c is None:
            return 0
        try:
            items = c.call(method)
        except Exception:
            return 0
    print("\n".join(i["name"] for i in items))
    return 0


def _flags(args: argparse.Namespace) -> int:
    from stoker.cli.main import build_parser

    p: argparse.ArgumentParser = build_parser()
    for w in args.words:
        nxt = None
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) and w in a.choices:
                nxt = a.choices[w]
        if nxt is None:
            break
        p = nxt
    flags = [s for a in p._actions for s in a.option_strings]
    print(" ".join(flags))
    return 0
