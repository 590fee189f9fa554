"""`--help` text the command modules leave out: an example per command, a line per flag.

Applied to whichever part of the argparse tree was built (see main.build_parser), so the
man page and `--help` say the same. A unit test walks the whole tree and fails on a command
without an example or a flag without help.
"""

from __future__ import annotations

import argparse

# Command path (without "stoker") -> example command lines.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": ("stoker vm run . -- make test", "stoker vm list", "stoker --debug doctor"),
    "version": ("stoker version --json",),
    "vm": ("stoker vm create --name web", "stoker vm ssh web"),
    "vm list": (
        "stoker vm list",
        "stoker vm list -q | xargs stoker vm stop",
        "stoker vm list --format name,state,spec.vcpu",
        "stoker vm list --format '{{.name}} {{.guest_ip}}'",
    ),
    "ps": ("stoker ps", "stoker ps --json"),
    "vm show": ("stoker vm show web", "stoker vm show web --format '{{.guest_ip}}'"),
    "vm create": (
        "stoker vm create --name web --vcpu 2 --memory 2048 --disk-size 16G",
        "stoker vm create --image debian-bookworm --nat --no-start",
        "stoker vm create --name ci-1 --ttl 30m",
    ),
    "vm start": ("stoker vm start web", "stoker vm start web db"),
    "vm stop": ("stoker vm stop web", "stoker vm stop $(stoker vm list -q)"),
    "vm restart": ("stoker vm restart web",),
    "vm kill": ("stoker vm kill web",),
    "vm delete": ("stoker vm delete web", "stoker vm rm web db"),
    "vm set": (
        "stoker vm set web --vcpu 4 --memory 4096",
        "stoker vm set web --disk-size 32G",
        "stoker vm set web --ttl 2h",
    ),
    "vm run": (
        "stoker vm run . -- make test",
        "stoker vm run --rm . -- pytest -q",
        "stoker vm run --rm -- 'uname -a > /tmp/u; cat /tmp/u'",
        "stoker vm run -d --name dev --ttl 8h ~/src/project",
    ),
    "vm exec": (
        "stoker vm exec dev -- git status",
        "stoker vm exec dev -- 'make test > log 2>&1; tail log'",
        'stoker vm exec dev -- ls -l "my file"',
        "stoker vm exec -e CI=1 -w /tmp --timeout 10m -u nobody dev -- ./check.sh",
        "stoker vm exec --auto-prepare dev -- make",
    ),
    "vm cp": (
        "stoker vm cp ./build dev:/root/",
        "stoker vm cp dev:/root/repo/out.log .",
    ),
    "vm workspace": (
        "stoker vm workspace prepare dev .",
        "stoker vm workspace export dev | git apply",
    ),
    "vm workspace prepare": (
        "stoker vm workspace prepare dev . --branch try-it",
        "stoker vm workspace prepare dev . --dry-run",
    ),
    "vm workspace export": (
        "stoker vm workspace export dev | git apply",
        "stoker vm workspace export dev -o changes.patch",
    ),
    "vm health": ("stoker vm health web", "stoker vm health web --json"),
    "vm stats": ("stoker vm stats", "stoker vm stats web --json"),
    "vm ports": ("stoker vm ports web",),
    "vm snapshot": (
        "stoker vm snapshot web --name before-upgrade",
        "stoker vm snapshot list web",
        "stoker vm snapshot delete web before-upgrade",
    ),
    "vm fork": (
        "stoker vm fork web --name web2",
        "stoker vm fork web --name web3 --snapshot before-upgrade",
    ),
    "vm prune": ("stoker vm prune", "stoker vm prune -f"),
    "vm logs": ("stoker vm logs web", "stoker vm logs -f web"),
    "vm ssh": (
        "stoker vm ssh web",
        "stoker vm ssh web -- 'echo hi > /root/f'",
        'stoker vm ssh web -- ls -l "my file"',
    ),
    "vm commit": ("stoker vm commit web my-env", "stoker vm commit web my-env --with-work-disk"),
    "image": ("stoker image build", "stoker image list"),
    "image list": ("stoker image list", "stoker image list -q"),
    "image show": ("stoker image show debian-bookworm", "stoker image show NAME --format size"),
    "image register": (
        "stoker image register mine --rootfs ./rootfs.ext4 --kernel debian-bookworm",
    ),
    "image promote": ("stoker image promote mine",),
    "image pull": ("stoker image pull debian-bookworm", "stoker image pull localhost:5000/app:1"),
    "vm port-forward": (
        "stoker vm port-forward web 8080:80",
        "stoker vm port-forward web 0.0.0.0:8443:443",
        "stoker vm port-forward web --remove 8080",
    ),
    "image push": (
        "stoker image push debian-bookworm registry.lan:5000/team/env:1",
        "stoker image pull registry.lan:5000/team/env:1",
    ),
    "image login": (
        "stoker image login registry.lan:5000 -u me",
        'echo "$TOKEN" | stoker image login ghcr.io -u me --password-stdin',
    ),
    "image logout": ("stoker image logout registry.lan:5000",),
    "image build": (
        "stoker image build",
        "stoker image build debian-bookworm --force",
        "stoker image build cdev --packages make,gcc --setup ./setup.sh",
        "stoker image build --recipe ./repo",
    ),
    "image cache": ("stoker image cache prune --dry-run",),
    "image cache prune": ("stoker image cache prune --dry-run", "stoker image cache prune"),
    "image delete": ("stoker image delete mine",),
    "kernel": ("stoker kernel list", "stoker kernel list --available"),
    "pool status": ("stoker pool status", "stoker pool status --json"),
    "kernel list": ("stoker kernel list", "stoker kernel list --available --json"),
    "kernel show": ("stoker kernel show debian-bookworm",),
    "kernel pull": ("stoker kernel pull debian-bookworm",),
    "kernel import": (
        "stoker kernel import mine --from ./linux-image-6.1.deb",
        "stoker kernel import mine --from /boot-dir",
    ),
    "kernel rm": ("stoker kernel rm mine",),
    "daemon": ("stoker daemon status",),
    "pool": ("stoker pool status",),
    "daemon status": ("stoker daemon status", "stoker daemon status --json"),
    "daemon stop": ("stoker daemon stop",),
    "daemon unit": ("stoker daemon unit | sudo tee /etc/systemd/system/stokerd.service",),
    "doctor": ("stoker doctor", "stoker doctor --json"),
    "system": ("stoker system install  # as root", "stoker system uninstall  # as root"),
    "system install": (
        "stoker system install",
        "stoker system install --group devs",
        "stoker system install --owner alice",
    ),
    "system uninstall": ("stoker system uninstall", "stoker system uninstall --purge"),
    "completion": (
        "stoker completion bash > ~/.local/share/bash-completion/completions/stoker",
        "stoker completion zsh > ~/.zfunc/_stoker",
        "stoker completion fish > ~/.config/fish/completions/stoker.fish",
    ),
    "ssh-config": ("stoker ssh-config --install", "ssh web.vm"),
}

# Help for arguments the command modules add without any, by (command path, dest).
_NOUN = {"vm": "VM", "image": "image", "kernel": "kernel"}


def _default_help(path: str, action: argparse.Action) -> str | None:
    group = path.split(" ", 1)[0]
    noun = _NOUN.get(group, "VM")
    dest = action.dest
    if dest == "json":
        return "print JSON (fields: docs/json-output.md)"
    if dest == "name" and not action.option_strings:
        return f"{noun} name"
    if dest == "names":
        return f"one or more {noun} names"
    if dest == "shell":
        return "the shell to print the script for"
    if dest == "follow":
        return "keep printing as the log grows"
    if dest == "source":
        return "a directory with vmlinuz/initrd, or a linux-image .deb"
    if dest == "guest_path":
        return "where in the guest (default /root/repo)"
    if dest == "path" and not action.option_strings:
        return "a git work tree on this host"
    if dest == "vcpu":
        return "number of virtual CPUs"
    return None


def _path(p: argparse.ArgumentParser) -> str:
    return p.prog.removeprefix("stoker").strip()


def document(ap: argparse.ArgumentParser) -> None:
    """Fill in examples (as the epilog) and missing flag help across the built tree."""
    seen: set[int] = set()
    todo = [ap]
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        path = _path(p)
        ex = EXAMPLES.get(path)
        if ex and not p.epilog:
            p.epilog = "examples:\n" + "\n".join(f"  $ {e}" for e in ex)
            p.formatter_class = argparse.RawDescriptionHelpFormatter
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend(c for n, c in a.choices.items() if not n.startswith("__"))
            elif a.help is None:
                a.help = _default_help(path, a)
