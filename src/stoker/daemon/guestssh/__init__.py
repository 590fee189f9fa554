"""Leaf: SSH to guests (asyncssh), the managed key, and stoker's own known_hosts."""

from stoker.daemon.guestssh.client import (
    GuestSSH,
    GuestSSHLike,
    SSHTarget,
    add_known_host,
    ensure_keypair,
    generate_host_key,
    remove_known_host,
)

__all__ = [
    "GuestSSH",
    "GuestSSHLike",
    "SSHTarget",
    "add_known_host",
    "ensure_keypair",
    "generate_host_key",
    "remove_known_host",
]
