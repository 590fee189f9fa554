"""`stoker vm ...` (and `stoker ps`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from stoker.cli.connect import client
from stoker.cli.render import add_output_flags, age, err, print_json, size, structured, table
from stoker.rpc.facade import TypedClient

TYPE_CHECKING = False  # no `typing` import at start-up
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from stoker.rpc.shapes import ExecDone, FanResult, PortForwardInfo, SSHInfo

    T = TypeVar("T")

# Every `vm` subcommand (and alias): only the one a command line names is built, since
# building all of them is most of a short command's start-up time.
SUBCOMMANDS = frozenset(
    {
        "list", "ls", "show", "create", "start", "stop", "restart", "kill", "delete", "rm",
        "set", "run", "exec", "workspace", "health", "stats", "ports", "prune", "logs", "ssh",
        "port-forward",
        "cp",
        "commit",
        "snapshot",
        "fork",
    }
)  # fmt: skip


def register(sub: Any, only: str | None = None) -> None:
    if only not in SUBCOMMANDS:
        only = None

    def want(*names: str) -> bool:
        return only is None or only in names

    vm = sub.add_parser("vm", help="create, run and manage VMs")
    vsub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    vm.set_defaults(func=lambda a: (vm.print_help(), 2)[1])

    if want("list", "ls"):
        p = vsub.add_parser("list", aliases=["ls"], help="list VMs")
        add_output_flags(p, "vm", listing=True)
        p.set_defaults(func=vm_list)
    ps = sub.add_parser("ps", help="alias of `vm list`")
    add_output_flags(ps, "vm", listing=True)
    ps.set_defaults(func=vm_list)

    if want("show"):
        p = vsub.add_parser("show", help="everything known about one VM")
        p.add_argument("name")
        add_output_flags(p, "vm", listing=False)
        p.set_defaults(func=vm_show)

    if want("create"):
        p = vsub.add_parser("create", help="create (and start) a VM")
        add_sizing(p)
        add_ttl(p)
        p.add_argument("--no-start", action="store_true", help="create the disks only")
        p.add_argument(
            "--from-snapshot",
            metavar="VM/SNAP",
            help="a new VM from snapshot SNAP of VM (its memory, disks copied, an identity "
            "of its own); SNAP alone when one VM has a snapshot of that name",
        )
        add_publish_flag(p)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_create)

    if want("fork"):
        p = vsub.add_parser(
            "fork",
            help="a new VM from a running VM's memory and disks, with an identity of its own",
        )
        p.add_argument("source", metavar="NAME", help="the VM to fork")
        p.add_argument("--name", required=True, metavar="NEW", help="the new VM's name")
        p.add_argument(
            "--snapshot",
            metavar="SNAP",
            help="fork NAME's snapshot SNAP (NAME may be stopped) instead of a fresh one",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_fork)

    if want("port-forward"):
        p = vsub.add_parser(
            "port-forward", help="forward host TCP ports to a running VM (held by the daemon)"
        )
        p.add_argument("name")
        p.add_argument(
            "specs",
            nargs="*",
            metavar="[HOST_ADDR:]HOST_PORT:GUEST_PORT",
            help="host address defaults to 127.0.0.1; HOST_PORT 0 picks a free port",
        )
        p.add_argument(
            "--remove", type=int, metavar="HOST_PORT", help="stop the forward from HOST_PORT"
        )
        p.add_argument("--list", action="store_true", help="list the VM's forwards")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_port_forward)

    for verb, helptext in (
        ("start", "boot stopped VMs and wait for SSH"),
        ("stop", "sync, power off and stop VMs"),
        ("restart", "stop then start VMs"),
        ("kill", "force-stop VMs (signal) and clean up"),
        ("delete", "stop if needed and remove VMs with their disks"),
    ):
        aliases = ["rm"] if verb == "delete" else []
        if not want(verb, *aliases):
            continue
        p = vsub.add_parser(verb, aliases=aliases, help=helptext)
        p.add_argument("names", nargs="+", metavar="NAME")
        p.add_argument("--json", action="store_true")
        if verb == "start":
            p.add_argument(
                "--from-snapshot",
                metavar="SNAP",
                help="resume one stopped VM from its snapshot SNAP (disks and memory)",
            )
        p.set_defaults(func=vm_multi, verb=verb)

    if want("set"):
        p = vsub.add_parser(
            "set", help="change sizing (at next start; disks only grow) or --net (at once)"
        )
        p.add_argument("name")
        p.add_argument("--vcpu", type=int)
        p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
        p.add_argument("--disk-size", help="work disk size, e.g. 16G (only grows)")
        p.add_argument("--net", metavar="POLICY", help=NET_HELP + " (applies to a running VM)")
        p.add_argument(
            "--ttl",
            metavar="DURATION",
            help="delete the VM DURATION from now (e.g. 30m, 2h, 1d; `none` clears it)",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_set)

    if want("run", "exec"):
        register_run(vsub)
    if want("cp"):
        from stoker.cli import cp

        cp.register(vsub)
    if want("workspace"):
        from stoker.cli import workspace

        workspace.register(vsub)

    if want("snapshot"):
        register_snapshot(vsub)

    if want("health"):
        p = vsub.add_parser("health", help="is the VM up? (guest agent, SSH fallback)")
        p.add_argument("name")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_health)

    if want("stats"):
        p = vsub.add_parser("stats", help="CPU, memory, disk use, uptime, last activity")
        p.add_argument("names", nargs="*", metavar="NAME")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_stats)

    if want("ports"):
        p = vsub.add_parser("ports", help="listening sockets in the guest as NAME.vm:PORT")
        p.add_argument("names", nargs="*", metavar="NAME")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_ports)

    if want("prune"):
        p = vsub.add_parser("prune", help="delete all VMs that are not running")
        p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
        p.set_defaults(func=vm_prune)

    if want("logs"):
        p = vsub.add_parser("logs", help="the guest serial console")
        p.add_argument("name")
        p.add_argument("-f", "--follow", action="store_true")
        p.set_defaults(func=vm_logs)

    if want("commit"):
        p = vsub.add_parser("commit", help="turn a stopped VM's root into a new image")
        p.add_argument("name", help="a stopped VM")
        p.add_argument("image", help="name of the new image")
        p.add_argument("--with-work-disk", action="store_true", help="also keep its /root")
        p.add_argument("--force", action="store_true", help="replace an existing image")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=vm_commit)

    if want("ssh"):
        p = vsub.add_parser(
            "ssh",
            help="ssh into a VM (system ssh, managed key)",
            description="stoker vm ssh NAME [-- CMD...]: a login shell, or CMD over SSH.\n\n"
            + COMMAND_LINE_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("name")
        p.set_defaults(func=vm_ssh, cmd=[])


NET_HELP = (
    "network policy: host-only (default: stoker's DNS only), none, nat, or "
    "allow=HOST[:PORT],...; add ,peers or ,peers=GROUP to reach VMs that opted in too"
)

COMMAND_LINE_HELP = """\
command lines (as ssh takes them): after --, ONE argument is a shell command line, run by
`bash -lc` (`sh -c` where the guest has no bash), e.g. -- 'make test > log 2>&1';
SEVERAL arguments are words, each quoted, e.g. -- ls -l "my file" keeps the space.
"""

EXIT_CODES_HELP = """\
environment: PATH, HOME, USER, LOGNAME, SHELL, LANG=C.UTF-8, and TERM from this
terminal's $TERM when set, else TERM=dumb; --env adds or overrides.

exit status: the command's own; 128+N when a signal N killed it; 124 when --timeout
ended it; 125 when stoker itself failed (VM not running, daemon or agent channel lost,
bad option); 126/127 when the guest could not execute / find the program.
"""


def command_line(cmd: list[str]) -> str:
    """The ssh rule: one argument is a command line as it stands, several are words."""
    import shlex

    return cmd[0] if len(cmd) == 1 else shlex.join(cmd)


def add_sizing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="VM name (RFC 1123 label; generated if absent)")
    p.add_argument("--image", help="image name (default from config: debian-bookworm)")
    p.add_argument("--vcpu", type=int)
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--disk-size", help="size of the /root work disk, e.g. 8G")
    p.add_argument("--net", metavar="POLICY", help=NET_HELP)
    p.add_argument("--nat", action="store_true", help="alias of --net nat")


def add_ttl(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ttl",
        metavar="DURATION",
        help="delete the VM this long after creation (e.g. 30m, 2h, 1d), even across "
        "daemon restarts; `vm set --ttl` changes it",
    )


def ttl_param(args: argparse.Namespace) -> dict[str, Any]:
    """{"ttl": seconds} from --ttl (raises ValueError with the message for bad input)."""
    text = getattr(args, "ttl", None)
    return {} if text is None else {"ttl": parse_duration(text, "--ttl")}


def time_left(expires_at: str | None) -> str:
    """`12m30s` until a store timestamp; `-` without one; `expired` once it passed."""
    if not expires_at:
        return "-"
    from datetime import UTC, datetime

    t = datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    left = int((t - datetime.now(UTC)).total_seconds())
    if left <= 0:
        return "expired"
    if left >= 86400:
        return f"{left // 86400}d{left % 86400 // 3600:02d}h"
    if left >= 3600:
        return f"{left // 3600}h{left % 3600 // 60:02d}m"
    return f"{left // 60}m{left % 60:02d}s"


def sizing_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": args.name,
        "image": args.image,
        "vcpu": args.vcpu,
        "memory_mib": args.memory,
        "disk_size": args.disk_size,
        "nat": args.nat,
        "net": args.net,
    }


def add_publish_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[HOST_ADDR:]HOST_PORT:GUEST_PORT",
        help="forward a host TCP port to the VM once it runs (repeatable)",
    )


def check_publish(args: argparse.Namespace) -> None:
    """Refuse bad -p specs before anything is created."""
    if not getattr(args, "publish", None):
        return
    from stoker.daemon.portfwd import parse_spec

    for spec in args.publish:
        parse_spec(spec)


def publish(args: argparse.Namespace, c: Any, name: str) -> list[PortForwardInfo]:
    """Apply -p forwards to a running VM; prints one line per forward."""
    if not getattr(args, "publish", None):
        return []
    fwds = TypedClient(c).vm.port_forward(name, args.publish)
    if not getattr(args, "json", False):
        for f in fwds:
            err(f"forwarding {f['listen']} -> {name}:{f['guest_port']}")
    return fwds


def vm_port_forward(args: argparse.Namespace) -> int:
    args.publish = args.specs
    check_publish(args)  # a malformed spec fails here, before any daemon is asked
    with client(args) as c:
        if args.remove is not None:
            gone = TypedClient(c).vm.port_forward_remove(args.name, args.remove)
            if args.json:
                print_json(gone)
            else:
                for f in gone:
                    print(f"removed {f['listen']} -> {args.name}:{f['guest_port']}")
            return 0
        if args.list or not args.specs:
            fwds = TypedClient(c).vm.port_forward_list([args.name])
        else:
            fwds = TypedClient(c).vm.port_forward(args.name, args.specs)
    if args.json:
        print_json(fwds)
    elif not fwds:
        print(f"no port forwards for {args.name}")
    else:
        table(
            ["HOST", "GUEST", "NAMESPACE", "CONNECTIONS"],
            [
                [f["listen"], f"{args.name}:{f['guest_port']}", f["namespace"], f["connections"]]
                for f in fwds
            ],
        )
    return 0


def vm_create(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress
    from stoker.errors import InvalidArgument

    check_publish(args)
    if args.publish and args.no_start:
        raise InvalidArgument("-p forwards to a running VM: drop --no-start or -p")
    try:
        ttl = ttl_param(args)
    except ValueError as e:
        from stoker.cli.render import UsageError

        raise UsageError(str(e)) from None
    params = {**sizing_params(args), "no_start": args.no_start, **ttl}
    if args.from_snapshot is not None:
        if not args.name:
            raise InvalidArgument("--from-snapshot needs the new VM's --name")
        params["from_snapshot"] = args.from_snapshot
    with client(args) as c:
        v = call_with_progress(c, "vm.create", params, args.json)
        v["port_forwards"] = _publish_or_delete(args, c, v["name"])
    if args.json:
        print_json(v)
    else:
        state = "created" if args.no_start else "running"
        print(f"{v['name']} {state} · {v['guest_ip']} · {v['dns_name']}")
        if not args.no_start:
            print(f"connect: stoker vm ssh {v['name']}")
    return 0


def vm_fork(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress

    params = {"ref": args.source, "name": args.name, "snapshot": args.snapshot}
    with client(args) as c:
        v = call_with_progress(c, "vm.fork", params, args.json)
    if args.json:
        print_json(v)
    else:
        print(f"{v['name']} forked from {args.source} · {v['guest_ip']} · {v['dns_name']}")
        print(f"connect: stoker vm ssh {v['name']}")
    return 0


def vm_commit(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress

    params = {
        "ref": args.name,
        "image": args.image,
        "with_work_disk": args.with_work_disk,
        "force": args.force,
    }
    with client(args) as c:
        i = call_with_progress(c, "vm.commit", params, args.json)
    if args.json:
        print_json(i)
    else:
        print(f"{i['name']} committed from {args.name} ({size(i['size'])}, parent {i['parent']})")
    return 0


def vm_multi(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress

    quiet = args.json or args.verb not in ("start", "restart")
    snap = getattr(args, "from_snapshot", None)
    if snap is not None:
        if len(args.names) != 1:
            from stoker.errors import InvalidArgument

            raise InvalidArgument("--from-snapshot restores one VM: give exactly one NAME")
        with client(args) as c:
            v = call_with_progress(
                c, "vm.start_from_snapshot", {"ref": args.names[0], "name": snap}, quiet
            )
        if args.json:
            print_json(v)
        else:
            print(f"{v['name']}: started from snapshot {snap}")
        return 0
    with client(args) as c:
        results = call_with_progress(c, f"vm.{args.verb}", {"refs": args.names}, quiet)
    if args.json:
        print_json(results)
    else:
        done = {
            "start": "started",
            "stop": "stopped",
            "restart": "restarted",
            "kill": "killed",
            "delete": "deleted",
        }[args.verb]
        for r in results:
            if r["ok"]:
                print(f"{r['ref']}: {done}")
            else:
                err(f"{r['ref']}: {r['error']}")
    return 0 if all(r["ok"] for r in results) else 1


def vm_set(args: argparse.Namespace) -> int:
    from stoker.cli.render import UsageError

    if (
        args.vcpu is None
        and args.memory is None
        and args.disk_size is None
        and args.net is None
        and args.ttl is None
    ):
        raise UsageError(
            "nothing to change: give --vcpu, --memory, --disk-size, --net and/or --ttl"
        )
    ttl: dict[str, Any] = {}
    if args.ttl is not None and args.ttl.lower() in ("none", "off", "never"):
        ttl = {"clear_ttl": True}
    else:
        try:
            ttl = ttl_param(args)
        except ValueError as e:
            raise UsageError(str(e)) from None
    with client(args) as c:
        v = TypedClient(c).vm.set(
            {
                "ref": args.name,
                "vcpu": args.vcpu,
                "memory_mib": args.memory,
                "disk_size": args.disk_size,
                "net": args.net,
                **ttl,
            },
        )
    if args.json:
        print_json(v)
    elif args.vcpu is None and args.memory is None and args.disk_size is None and args.net is None:
        print(f"{v['name']}: TTL {time_left(v.get('expires_at'))}")
    else:
        s = v["spec"]
        print(
            f"{v['name']}: {s['vcpu']} vcpu · {s['memory_mib']} MiB · "
            f"{size(s['disk_size'])} disk (applies at next start)"
        )
        if args.net is not None:
            when = "now" if v["state"] == "running" else "at next start"
            print(f"{v['name']}: net {s.get('net')} (applies {when})")
    return 0


def vm_logs(args: argparse.Namespace) -> int:
    import time

    with client(args) as c:
        info = TypedClient(c).vm.logs(args.name)
    path = info["path"]
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        err(f"VM {info['name']} has no console log yet ({path}): it has not been started")
        return 1
    except PermissionError:
        # The daemon's file, not ours (a group member of a system install): it reads it.
        return _vm_logs_rpc(args)
    out = sys.stdout.buffer
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not args.follow:
                return 0
            time.sleep(0.2)


def _vm_logs_rpc(args: argparse.Namespace) -> int:
    """`vm logs` through the daemon (`vm.logs.read`), for a log this user cannot open."""
    import base64
    import time

    out = sys.stdout.buffer
    offset = 0
    with client(args) as c:
        while True:
            chunk = c.call("vm.logs.read", {"ref": args.name, "offset": offset})
            if chunk["size"] < 0:
                err(f"VM {chunk['name']} has no console log yet: it has not been started")
                return 1
            data = base64.b64decode(chunk["data"])
            if data:
                out.write(data)
                out.flush()
                offset += len(data)
                continue
            if not args.follow:
                return 0
            time.sleep(0.5)


def ssh_argv(info: SSHInfo, tty: bool) -> list[str]:
    return [
        "ssh",
        "-i",
        info["key"],
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={info['known_hosts']}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        *(["-t"] if tty else ["-T"]),
        f"{info['user']}@{info['host']}",
    ]


def vm_ssh(args: argparse.Namespace) -> int:
    import subprocess

    cmd = list(args.cmd)
    with client(args) as c:
        # A VM made ready by its agent (`vm run -- CMD`) may not answer SSH yet.
        info = TypedClient(c).vm.ssh_info(args.name, wait=True, progress=_quiet_progress)
    if info["state"] != "running":
        err(f"VM {info['name']} is {info['state']}: start it with `stoker vm start {info['name']}`")
        return 1
    interactive = not cmd
    argv = ssh_argv(info, tty=interactive and sys.stdin.isatty())
    if cmd:
        argv.append(ssh_command(command_line(cmd), None, {}))
    rc = subprocess.call(argv)
    if interactive:
        remind_running(args, info["name"])
    return rc


def vm_list(args: argparse.Namespace) -> int:
    with client(args) as c:
        vms = TypedClient(c).vm.list()
    if structured(args, vms):
        return 0
    if not vms:
        print("no VMs: create one with `stoker vm create` or `stoker vm run`")
        return 0
    rows = []
    for v in vms:
        spec = v["spec"]
        ws = v.get("workspace")
        rows.append(
            [
                v["name"],
                v["state"],
                v["image"],
                v["guest_ip"],
                f"{spec['vcpu']}/{spec['memory_mib']}M",
                ws["guest_path"] if ws else "-",
                age(v["created_at"]),
                time_left(v.get("expires_at")),
            ]
        )
    table(["NAME", "STATE", "IMAGE", "IP", "VCPU/MEM", "WORKSPACE", "AGE", "TTL"], rows)
    return 0


def vm_show(args: argparse.Namespace) -> int:
    with client(args) as c:
        v = TypedClient(c).vm.show(args.name)
    if structured(args, v):
        return 0
    spec = v["spec"]
    print(f"name:       {v['name']}")
    print(f"id:         {v['id']}")
    print(f"state:      {v['state']}")
    if v.get("system_image"):
        print(f"image:      {v['image']} (workload root, on system image {v['system_image']})")
    else:
        print(f"image:      {v['image']}")
    print(
        f"spec:       {spec['vcpu']} vcpu · {spec['memory_mib']} MiB · "
        f"{size(spec['disk_size'])} disk"
    )
    print(f"net:        {spec.get('net') or ('nat' if spec.get('nat') else 'host-only')}")
    print(f"ip:         {v['guest_ip']}  ({v['dns_name']})")
    print(f"created:    {v['created_at']} ({age(v['created_at'])} ago)")
    if v.get("started_at"):
        print(f"started:    {v['started_at']}")
    ws = v.get("workspace")
    if ws:
        print(f"workspace:  {ws['host_path']} -> {ws['guest_path']} @ {ws['head'][:12]}")
    if v.get("last_error"):
        print(f"last error: {v['last_error']}")
    for f in v.get("port_forwards") or []:
        print(f"forward:    {f['listen']} -> {f['guest_port']}")
    print(f"dir:        {v['vm_dir']}")
    return 0


def vm_prune(args: argparse.Namespace) -> int:
    with client(args) as c:
        vms = TypedClient(c).vm.list()
        victims = [v["name"] for v in vms if v["state"] not in ("running", "starting")]
        if not victims:
            print("nothing to prune: every VM is running")
            return 0
        print("these VMs and their disks will be deleted:")
        for v in vms:
            if v["name"] in victims:
                print(f"  {v['name']}  ({v['state']}, {v['image']})")
        if not args.force:
            if not sys.stdin.isatty():
                err("not a terminal: pass -f to prune without confirmation")
                return 1
            answer = input("delete them? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing deleted")
                return 1
        results = TypedClient(c).vm.prune(victims)
    for r in results:
        if r["ok"]:
            print(f"{r['ref']}: deleted")
        else:
            err(f"{r['ref']}: {r['error']}")
    return 0 if all(r["ok"] for r in results) else 1


def _results(args: argparse.Namespace, results: list[FanResult[T]]) -> tuple[list[T], bool]:
    ok = True
    rows: list[T] = []
    for r in results:
        if r["ok"]:
            res = r.get("result")
            if res is not None:
                rows.append(res)
        else:
            ok = False
            err(f"{r['ref']}: {r['error']}")
    return rows, ok


def vm_stats(args: argparse.Namespace) -> int:
    with client(args) as c:
        results = TypedClient(c).vm.stats(args.names)
    rows, ok = _results(args, results)
    if args.json:
        print_json(rows)
        return 0 if ok else 1

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}%"

    def dur(v: Any) -> str:
        if v is None:
            return "-"
        v = int(v)
        return f"{v // 3600}h{v % 3600 // 60:02d}m" if v >= 3600 else f"{v // 60}m{v % 60:02d}s"

    table(
        ["NAME", "STATE", "CPU", "VMM RSS", "GUEST MEM", "OVERLAY", "WORK DISK", "UPTIME", "IDLE"],
        [
            [
                s["name"],
                s["state"],
                pct(s.get("cpu_percent")),
                size(s.get("vmm_rss_bytes")),
                size(s.get("guest_mem_used")),
                size(s["overlay_bytes"]),
                size(s["work_disk_bytes"]),
                dur(s.get("uptime_s")),
                dur(s.get("last_activity_age_s")),
            ]
            for s in rows
        ],
    )
    return 0 if ok else 1


def vm_ports(args: argparse.Namespace) -> int:
    with client(args) as c:
        port_results = TypedClient(c).vm.ports(args.names)
    port_rows, ok = _results(args, port_results)
    flat = [p for r in port_rows for p in r]
    if args.json:
        print_json(flat)
        return 0 if ok else 1
    if not flat and ok:
        print("no listening sockets")
    table(
        ["ENDPOINT", "PROTO", "PROCESS", "URL"],
        [
            [
                p["endpoint"] + (" (loopback)" if p["loopback_only"] else ""),
                p["proto"],
                p["process"] or "-",
                " ".join([p["url"] or "", *(f"<- {h}" for h in p.get("forwarded_from") or [])]),
            ]
            for p in flat
        ],
    )
    return 0 if ok else 1


# --- vm run / vm exec ------------------------------------------------------------------


def register_run(vsub: Any) -> None:
    p = vsub.add_parser(
        "run",
        help="create + start a VM, copy a git workspace in, run a command or a shell",
        description="stoker vm run [PATH] [-- CMD...]: with CMD, the command runs through the\n"
        "guest agent as soon as it answers (no wait for sshd; SSH when the image's agent\n"
        "cannot run commands); without, an interactive login shell over SSH.\n\n"
        + COMMAND_LINE_HELP
        + "\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", nargs="?", help="a git work tree to copy to /root/repo")
    add_sizing(p)
    add_ttl(p)
    p.add_argument("--rm", action="store_true", help="delete the VM when the command ends")
    p.add_argument("-d", "--detach", action="store_true", help="prepare and exit")
    add_publish_flag(p)
    add_workspace_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the files and mode only")
    p.set_defaults(func=vm_run, cmd=[])

    p = vsub.add_parser(
        "exec",
        help="run a command in a VM (guest agent; SSH fallback)",
        description="stoker vm exec NAME [options] -- CMD...: run CMD in the VM's workspace\n"
        "(/root/repo when prepared, else /root; an OCI workload root: else its WORKDIR)\n"
        "through the guest agent, stdout and stderr\n"
        "streamed separately; stdin is forwarded when it is not a terminal; Ctrl-C and\n"
        "SIGTERM are forwarded to the command.\n\n" + COMMAND_LINE_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name")
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable (repeatable)",
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="guest working directory")
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        help="kill the command's process group after DURATION (e.g. 30, 90s, 5m); exit 124",
    )
    p.add_argument("-u", "--user", help="run as this guest user (default root)")
    p.add_argument(
        "-n", "--no-stdin", action="store_true", help="do not forward stdin (like ssh -n)"
    )
    p.add_argument("--ssh", action="store_true", help="use SSH, not the guest agent")
    p.add_argument(
        "--auto-prepare",
        action="store_true",
        help="re-sync the workspace first when the host repo moved",
    )
    p.set_defaults(func=vm_exec, cmd=[])


def add_workspace_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--branch", help="create this guest-only branch")
    p.add_argument("--from", dest="from_ref", metavar="REF", help="start --branch from REF")
    p.add_argument(
        "--include-untracked",
        action="store_true",
        help="also ship untracked files that are not ignored",
    )


STOKER_FAILED = 125  # stoker's own failure, as `docker run` reports it


def parse_duration(text: str, what: str) -> float:
    """`30`, `90s`, `5m`, `2h`, `1d` -> seconds (positive)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    scale = units.get(t[-1:])
    num = t[:-1] if scale is not None else t
    try:
        value = float(num) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(
            f"{what} {text!r} is not a duration: give a positive number of seconds or one "
            "with a unit, e.g. 30, 90s, 5m, 2h, 1d"
        )
    return value


def ssh_command(line: str, cwd: str | None, env: dict[str, str]) -> str:
    """The remote command line that runs `line` the way the agent does: in `cwd`, with the
    documented environment, by `bash -lc` (or `sh -c` without bash)."""
    import os
    import shlex

    q = shlex.quote
    term = os.environ.get("TERM") or "dumb"
    assigns = " ".join(f"{k}={q(v)}" for k, v in {"LANG": "C.UTF-8", "TERM": term, **env}.items())
    cd = f"cd {q(cwd)} || exit {STOKER_FAILED}; " if cwd else ""
    return (
        f"{cd}export {assigns}; if command -v bash >/dev/null 2>&1; then exec bash -lc "
        f"{q(line)}; else exec sh -c {q(line)}; fi"
    )


def _quiet_progress(ev: dict[str, Any]) -> None:
    if ev.get("stage") == "ssh":
        print(f"stoker: {ev.get('message', '')}", file=sys.stderr, flush=True)


class AgentExec:
    """One `vm.exec` call: output to our stdout/stderr (or `out`/`err`) as it comes; stdin
    (ours, or what `feed` produces) and signals sent on a second connection once the
    daemon names the exec."""

    def __init__(
        self,
        args: argparse.Namespace,
        forward_stdin: bool,
        out: Any = None,
        err: Any = None,
        feed: Callable[[Callable[[bytes], bool]], None] | None = None,
        connect: Callable[..., Any] | None = None,
    ) -> None:
        self.args = args
        # How to reach stokerd: `connect(autostart=...)` -> an RPC client (the SDK's own).
        self.connect = connect or (lambda autostart=True: client(args, autostart=autostart))
        self.forward_stdin = forward_stdin or feed is not None
        self.feed = feed or self._read_stdin
        self.token: str | None = None
        self.signals = 0
        self.out = out if out is not None else sys.stdout.buffer
        self.err = err if err is not None else sys.stderr.buffer
        self.feed_error: BaseException | None = None

    def on_event(self, ev: dict[str, Any]) -> None:
        stage = ev.get("stage")
        if stage == "exec.output":
            import base64

            f = self.out if ev.get("fd") == 1 else self.err
            f.write(base64.b64decode(ev.get("data", "")))
            f.flush()
        elif stage == "exec.started":
            self.token = ev.get("exec")
            if self.forward_stdin and self.token:
                import threading

                threading.Thread(target=self._pump, daemon=True).start()

    @staticmethod
    def _read_stdin(write: Callable[[bytes], bool]) -> None:
        import os

        fd = sys.stdin.fileno()
        while True:
            data = os.read(fd, 32768)
            if not write(data) or not data:
                return

    def _pump(self) -> None:
        import base64

        from stoker.errors import StokerError

        try:
            with self.connect(autostart=False) as c:

                def write(data: bytes) -> bool:
                    assert self.token is not None  # fed only after exec.started
                    r = TypedClient(c).vm.exec_input(
                        self.token, base64.b64encode(data).decode(), eof=not data
                    )
                    return r["open"]

                self.feed(write)
        except (StokerError, OSError) as e:
            self.feed_error = e  # the exec ended; nothing more to feed
        except Exception as e:
            self.feed_error = e

    def forward(self, signum: int, frame: Any) -> None:
        import signal

        self.signals += 1
        if self.token is None or self.signals > 3:
            raise KeyboardInterrupt  # the connection closes: the daemon kills the process
        name = "INT" if signum == signal.SIGINT else "TERM"
        from stoker.errors import StokerError

        try:
            with self.connect(autostart=False) as c:
                TypedClient(c).vm.exec_signal(self.token, name)
        except StokerError:
            pass

    def run(self, params: dict[str, Any]) -> ExecDone:
        import signal
        import threading

        params = {**params, "stdin": self.forward_stdin}
        old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # else: the caller's job
            old = {s: signal.signal(s, self.forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.connect() as c:
                return TypedClient(c).vm.exec(params, self.on_event)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def run_command(
    args: argparse.Namespace,
    name: str,
    line: str,
    *,
    cwd: str | None,
    env: dict[str, str],
    user: str | None = None,
    timeout: float | None = None,
    stdin: bool = False,
    ssh_only: bool = False,
) -> int:
    """Run a command line in a running VM: the guest agent, else SSH. The exit status."""
    import os

    term = os.environ.get("TERM")
    full_env = {**({"TERM": term} if term else {}), **env}
    if not ssh_only:
        params: dict[str, Any] = {
            "ref": name,
            "shell": line,
            "cwd": cwd,
            "env": full_env,
            "user": user,
            "stdin": stdin,
            "timeout": timeout,
        }
        r = AgentExec(args, stdin).run(params)
        if r.get("transport") == "agent":
            if r.get("timed_out"):
                err(f"command timed out after {timeout:g}s: its process group was killed")
            elif r.get("signal"):
                err(f"command killed by signal {r['signal']}")
            return int(r["exit_code"])
        err(f"note: running over SSH: {r.get('reason')}")
    if user:
        err("--user needs the guest agent, which cannot run commands in this VM")
        return STOKER_FAILED
    import subprocess

    with client(args) as c:
        info = TypedClient(c).vm.ssh_info(name, wait=True, progress=_quiet_progress)
    remote = ssh_command(line, cwd or info.get("workspace") or "/root", env)
    if timeout is not None:
        import shlex

        remote = f"exec timeout -k 2 {timeout:g} sh -c {shlex.quote(remote)}"
    argv = [*ssh_argv(info, tty=False), remote]
    return subprocess.call(argv, stdin=None if stdin else subprocess.DEVNULL)


def _stdin_piped() -> bool:
    """Forward stdin when it is a pipe or file, not when it is a terminal (or closed)."""
    try:
        return not sys.stdin.isatty() and sys.stdin.fileno() >= 0
    except (OSError, ValueError, AttributeError):
        return False


def vm_run(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from stoker.cli.progress import call_with_progress
    from stoker.errors import StokerError

    cmd = list(args.cmd)
    if args.detach and args.rm:
        err("-d and --rm cannot be combined: a detached VM would be deleted at once")
        return 1
    if args.detach and cmd:
        err("-d and -- CMD cannot be combined: run the command with `stoker vm exec` later")
        return 1
    if args.from_ref and not args.branch:
        err("--from needs --branch")
        return 1
    path = os.path.abspath(args.path) if args.path else None
    check_publish(args)
    try:
        ttl = ttl_param(args)
    except ValueError as e:
        err(str(e))
        return STOKER_FAILED if cmd else 1
    with client(args) as c:
        if path is not None:
            # Preflight before anything is created: a real, non-bare work tree, no submodules.
            plan = TypedClient(c).workspace.inspect(
                {
                    "path": path,
                    "include_untracked": args.include_untracked,
                    "list_files": args.dry_run,
                },
            )
            if args.dry_run:
                from stoker.cli.workspace import print_dry_run

                return print_dry_run(plan, args.include_untracked)
        elif args.dry_run:
            err("--dry-run needs a PATH: it shows which files would be copied")
            return 1
        from stoker.cli.envs import recipe_for_run

        # A command without a workspace needs only the agent (no wait for sshd); a
        # workspace is copied over SSH, and a shell is SSH.
        ready = "agent" if cmd and path is None else "ssh"
        v = call_with_progress(
            c,
            "vm.create",
            {**sizing_params(args), "ready": ready, **ttl, **recipe_for_run(c, args, path)},
        )
        name = v["name"]
        _publish_or_delete(args, c, name)
        rc = 0
        try:
            # A workload root (docs/guest-boot.md) has its own default directory (its
            # WORKDIR) and perhaps no bash: only a workspace sets the directory there.
            workload = bool(v.get("system_image"))
            workdir: str | None = None if workload else "/root"
            if path is not None:
                ws = call_with_progress(
                    c,
                    "vm.workspace.prepare",
                    {
                        "ref": name,
                        "path": path,
                        "branch": args.branch,
                        "from_ref": args.from_ref,
                        "include_untracked": args.include_untracked,
                    },
                )
                workdir = ws["guest_path"]
            if args.detach:
                print(
                    f"{name} is running at {v['guest_ip']} ({v['dns_name']}); "
                    f"`stoker vm exec {name} -- CMD` or `stoker vm ssh {name}`"
                )
                return 0
            if cmd:
                rc = run_command(
                    args, name, command_line(cmd), cwd=workdir, env={}, stdin=_stdin_piped()
                )
            else:
                info = TypedClient(c).vm.ssh_info(name, wait=True, progress=_quiet_progress)
                argv = ssh_argv(info, tty=sys.stdin.isatty())
                if not workload:
                    argv.append(f"cd {workdir} && exec bash -l")
                elif workdir is not None:
                    argv.append(f"cd {workdir} && exec /bin/sh -l")
                rc = subprocess.call(argv)
            if not cmd and not args.rm:
                remind_running(args, name)
        except KeyboardInterrupt:
            rc = 130
        except StokerError as e:
            if not cmd:
                raise
            err(e.message)
            rc = STOKER_FAILED
        finally:
            if args.rm:
                _delete_fresh(args, name)
    return rc


def _publish_or_delete(args: argparse.Namespace, c: Any, name: str) -> list[PortForwardInfo]:
    """-p forwards for a VM this command just made; on failure the VM goes too."""
    from stoker.errors import StokerError

    try:
        return publish(args, c, name)
    except StokerError:
        TypedClient(c).vm.delete([name])
        raise


def _delete_fresh(args: argparse.Namespace, name: str) -> None:
    """--rm: delete over a fresh connection, so an interrupted session still cleans up."""
    import signal

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip it
    try:
        with client(args) as c:
            r = TypedClient(c).vm.delete([name])
        if r and r[0]["ok"]:
            print(f"stoker: deleted {name}", file=sys.stderr)
        else:
            err(f"could not delete {name}: {r[0]['error'] if r else '?'}")
    finally:
        signal.signal(signal.SIGINT, old)


def vm_exec(args: argparse.Namespace) -> int:
    from stoker.errors import StokerError

    if not args.cmd:
        err("give the command after --: stoker vm exec NAME -- CMD")
        return 2
    env: dict[str, str] = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            err(f"--env {item!r} is not K=V: write it as NAME=VALUE")
            return STOKER_FAILED
        env[k] = v
    timeout = None
    if args.timeout is not None:
        try:
            timeout = parse_duration(args.timeout, "--timeout")
        except ValueError as e:
            err(str(e))
            return STOKER_FAILED
    try:
        with client(args) as c:
            info = TypedClient(c).vm.ssh_info(args.name)
            if info["state"] != "running":
                err(
                    f"VM {info['name']} is {info['state']}: start it with "
                    f"`stoker vm start {info['name']}`"
                )
                return STOKER_FAILED
            ws = info.get("workspace_record")
            if ws and ws.get("host_path"):
                moved = _host_head_moved(ws["host_path"], ws.get("head"))
                if moved and args.auto_prepare:
                    from stoker.cli.progress import call_with_progress

                    call_with_progress(
                        c,
                        "vm.workspace.prepare",
                        {
                            "ref": info["name"],
                            "path": ws["host_path"],
                            "guest_path": ws["guest_path"],
                        },
                    )
                elif moved:
                    err(
                        f"warning: {ws['host_path']} HEAD moved since the workspace was "
                        f"prepared ({(ws.get('head') or '')[:12]} -> {moved[:12]}); "
                        "pass --auto-prepare to re-sync"
                    )
        return run_command(
            args,
            info["name"],
            command_line(args.cmd),
            cwd=args.workdir,
            env=env,
            user=args.user,
            timeout=timeout,
            stdin=not args.no_stdin and _stdin_piped(),
            ssh_only=args.ssh,
        )
    except StokerError as e:
        err(e.message)
        return STOKER_FAILED
    except KeyboardInterrupt:
        return 130


def _host_head_moved(host_path: str, head: str | None) -> str | None:
    """The host repo's HEAD when it differs from the prepared one, else None."""
    import subprocess

    r = subprocess.run(
        ["git", "-C", host_path, "rev-parse", "-q", "--verify", "HEAD"],
        capture_output=True,
        text=True,
    )
    cur = r.stdout.strip() if r.returncode == 0 else None
    return cur if cur and cur != head else None


def remind_running(args: argparse.Namespace, name: str) -> None:
    """After an interactive session: ask the agent whether the VM still runs, and say so."""
    try:
        with client(args, autostart=False) as c:
            h = TypedClient(c).vm.health(name)
    except Exception:
        return
    if h.get("running"):
        print(
            f"stoker: {name} is still running (stop it with `stoker vm stop {name}`)",
            file=sys.stderr,
        )
    else:
        print(f"stoker: {name} has stopped", file=sys.stderr)


def vm_health(args: argparse.Namespace) -> int:
    with client(args) as c:
        h = TypedClient(c).vm.health(args.name)
    if args.json:
        print_json(h)
    elif not h.get("running"):
        print(f"{h['name']}: not running ({h['state']})")
    elif (a := h["agent"]) is not None:
        print(
            f"{h['name']}: {'healthy' if h['healthy'] else 'unhealthy'} (agent "
            f"{a['agent_version']}, up {a['uptime_s']:.0f}s, load {a['load'][0]:.2f}, "
            f"sshd {'up' if a['sshd_running'] else 'down'})"
        )
    else:
        via = "SSH answers" if h.get("healthy") else "SSH does not answer either"
        print(f"{h['name']}: agent not responding ({h.get('agent_error')}); {via}")
    return 0 if h.get("healthy") else 1


def register_snapshot(vsub: Any) -> None:
    """`vm snapshot NAME [--name SNAP]`, `vm snapshot list [NAME]`, `vm snapshot delete
    NAME SNAP` (argparse cannot mix a positional with subcommands: the first word picks)."""
    p = vsub.add_parser(
        "snapshot",
        help="snapshot a running VM (memory + disks), or `snapshot list` / `snapshot delete`",
        usage="stoker vm snapshot NAME [--name SNAP] | list [NAME] | delete NAME SNAP",
    )
    p.add_argument(
        "words",
        nargs="+",
        metavar="NAME|list|delete",
        help="the VM to snapshot, or `list [NAME]`, or `delete NAME SNAP`",
    )
    p.add_argument("--name", dest="snap", metavar="SNAP", help="snapshot name (default: a time)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=vm_snapshot)


def vm_snapshot(args: argparse.Namespace) -> int:
    from stoker.errors import InvalidArgument

    words = list(args.words)
    if words[0] == "list":
        if len(words) > 2:
            raise InvalidArgument("usage: stoker vm snapshot list [NAME]")
        with client(args) as c:
            snaps = TypedClient(c).vm.snapshot_list(words[1] if len(words) > 1 else None)
        if args.json:
            print_json(snaps)
        elif not snaps:
            print("no snapshots")
        else:
            table(
                ["VM", "SNAPSHOT", "CREATED", "VMM"],
                [
                    [
                        s["vm"],
                        s["name"],
                        age(s["created_at"]),
                        f"{s['meta'].get('vmm')} {s['meta'].get('vmm_version')}",
                    ]
                    for s in snaps
                ],
            )
        return 0
    if words[0] == "delete":
        if len(words) != 3:
            raise InvalidArgument("usage: stoker vm snapshot delete NAME SNAP")
        with client(args) as c:
            out = TypedClient(c).vm.snapshot_delete(words[1], words[2])
        print_json(out) if args.json else print(f"deleted snapshot {out['name']} of {out['vm']}")
        return 0
    if len(words) != 1:
        raise InvalidArgument(
            "usage: stoker vm snapshot NAME [--name SNAP] (or `list [NAME]`, `delete NAME SNAP`)"
        )
    from stoker.cli.progress import call_with_progress

    with client(args) as c:
        out = call_with_progress(c, "vm.snapshot", {"ref": words[0], "name": args.snap}, args.json)
    if args.json:
        print_json(out)
    else:
        print(f"snapshot {out['name']} of {out['vm']}: {size(out['bytes'])} in {out['dir']}")
    return 0
