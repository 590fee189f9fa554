"""Run as a non-root user inside a test namespace: HostNetwork with stoker-helper doing
every host change. Prints a JSON report after setting up, waits for a line on stdin, then
tears down and prints a second report.

argv: HELPER_SOCKET BRIDGE CIDR
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from stoker.config import parse_config
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.hostnet.privileged import helper_tap_opener
from stoker.daemon.vmm import confine
from stoker.errors import StokerError
from stoker.helper.client import HelperClient
from stoker.runner import Runner


async def main() -> None:
    sock, bridge, cidr = sys.argv[1:4]
    cfg = parse_config(
        {
            "bridge_name": bridge,
            "bridge_cidr": cidr,
            "tap_pool_size": 0,
            "dns_listen": "127.0.0.1:5399",
        }
    )
    helper = HelperClient(Path(sock), timeout=20, retry_delay=0.2)
    confine.TAP_OPENER = helper_tap_opener(helper)
    net = HostNetwork(cfg, Runner(), logging.getLogger("t"), helper=helper)
    report: dict[str, object] = {"euid": os.geteuid()}
    try:
        open("/dev/net/tun", "rb").close()
        report["tun_direct"] = "opened"
    except OSError as e:
        report["tun_direct"] = e.strerror
    await net.start()
    report["helper_error"] = net.helper_error
    await net.ensure_bridge()
    tap = await net.acquire_tap()
    await net.attach_tap(tap)
    ip = net.allocate_ip(set())
    await net.apply_policy("vm1", ip, tap, "02:00:00:00:00:09", "host-only")
    fd = confine.open_tap(tap)
    report.update(
        tap=tap,
        ip=ip,
        tap_fd_is_tun=os.readlink(f"/proc/self/fd/{fd}"),
        guest_dns=net.guest_dns.address,
        guest_dns_error=net.guest_dns_error,
        policy_ids=sorted(await net.policy_vm_ids()),
        status_helper=dataclasses.asdict(net.status()).get("helper"),
    )
    # Not the caller's: another name is refused even through the daemon's own code path.
    try:
        await net.links.delete("eth0")
        report["foreign_delete"] = "deleted"
    except StokerError as e:
        report["foreign_delete"] = e.code
    print(json.dumps(report), flush=True)
    sys.stdin.readline()
    os.close(fd)
    await net.remove_policy("vm1")
    await net.release_tap(tap)
    torn = await net.teardown_bridge_if_unused()
    await net.close()
    print(json.dumps({"torn_down": torn}), flush=True)


asyncio.run(main())
