"""`stoker vm ...` (and `stoker ps`)."""

from __future__ import annotations

import argparse
from typing import Any

from stoker.cli.connect import client
from stoker.cli.render import age, print_json, size, table


def register(sub: Any) -> None:
    vm = sub.add_parser("vm", help="create, run and manage VMs")
    vsub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    vm.set_defaults(func=lambda a: (vm.print_help(), 2)[1])

    for name, aliases in (("list", ["ls"]),):
        p = vsub.add_parser(name, aliases=aliases, help="list VMs")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=vm_list)
    ps = sub.add_parser("ps", help="alias of `vm list`")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.set_defaults(func=vm_list)

    p = vsub.add_parser("show", help="everything known about one VM")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=vm_show)


def vm_list(args: argparse.Namespace) -> int:
    with client(args) as c:
        vms = c.call("vm.list")
    if args.json:
        print_json(vms)
        return 0
    if not vms:
        print("no VMs: create one with `stoker vm create` or `stoker vm run`")
        return 0
    rows = []
    for v in vms:
        spec = v["spec"]
        ws = v.get("workspace") or {}
        rows.append(
            [
                v["name"],
                v["state"],
                v["image"],
                v["guest_ip"],
                f"{spec['vcpu']}/{spec['memory_mib']}M",
                ws.get("guest_path", "-"),
                age(v["created_at"]),
            ]
        )
    table(["NAME", "STATE", "IMAGE", "IP", "VCPU/MEM", "WORKSPACE", "AGE"], rows)
    return 0


def vm_show(args: argparse.Namespace) -> int:
    with client(args) as c:
        v = c.call("vm.show", {"ref": args.name})
    if args.json:
        print_json(v)
        return 0
    spec = v["spec"]
    print(f"name:       {v['name']}")
    print(f"id:         {v['id']}")
    print(f"state:      {v['state']}")
    print(f"image:      {v['image']}")
    print(
        f"spec:       {spec['vcpu']} vcpu · {spec['memory_mib']} MiB · "
        f"{size(spec['disk_size'])} disk{' · nat' if spec.get('nat') else ''}"
    )
    print(f"ip:         {v['guest_ip']}  ({v['dns_name']})")
    print(f"created:    {v['created_at']} ({age(v['created_at'])} ago)")
    if v.get("started_at"):
        print(f"started:    {v['started_at']}")
    ws = v.get("workspace")
    if ws:
        print(f"workspace:  {ws['host_path']} -> {ws['guest_path']} @ {ws['head'][:12]}")
    if v.get("last_error"):
        print(f"last error: {v['last_error']}")
    print(f"dir:        {v['vm_dir']}")
    return 0
