"""Config: every key optional and validated, VM defaults with provenance, file loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stoker.config import (
    BUILTIN_DISK_SIZE,
    BUILTIN_MEMORY_MIB,
    BUILTIN_OVERLAY_SIZE,
    BUILTIN_VCPU,
    GiB,
    config_path,
    load_config,
    parse_config,
)
from stoker.errors import ConfigError
from stoker.layout import Layout

pytestmark = pytest.mark.unit

# An existing regular file for [[file_sync]] host paths (they are checked at load).
HOSTFILE = os.path.abspath(__file__)


def test_empty_config_is_all_defaults() -> None:
    c = parse_config({})
    assert c.vmm == "auto"
    assert c.bridge_name == "br-stoker"
    assert c.bridge_cidr == "172.30.0.0/24"
    assert c.gateway_ip == "172.30.0.1"
    assert c.file_sync == ()
    assert c.path is None


def test_full_valid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".gitconfig").write_text("[user]\n")
    data: dict[str, Any] = {
        "log_level": "DEBUG",
        "vmm": "qemu",
        "firecracker_bin": "/opt/fc/firecracker",
        "jailer_bin": "/opt/fc/jailer",
        "qemu_bin": "qemu-system-x86_64",
        "use_jailer": True,
        "bridge_name": "br-test",
        "bridge_cidr": "10.77.0.5/24",
        "tap_pool_size": 4,
        "dns_listen": "127.0.0.1:5300",
        "guest_dns": ["9.9.9.9", "2620:fe::fe"],
        "default_image": "my-image",
        "debian_mirror": "http://deb.example/debian",
        "auto_stop_stale_after": "2h",
        "stats_poll_interval": "30s",
        "op_prune_interval": 120,
        "vm_defaults": {"vcpu": 2, "memory_mib": 2048, "disk_size": "16G", "overlay_size": "4G"},
        "file_sync": [
            {"host": "~/.gitconfig", "guest": "/root/.gitconfig", "mode": "0644"},
            {"host": HOSTFILE, "guest": "/root/./x//hostname"},
        ],
    }
    c = parse_config(data, cpus=8, mem_bytes=16 * GiB)
    assert c.log_level == "debug"
    assert c.vmm == "qemu"
    assert c.use_jailer is True
    assert c.bridge_cidr == "10.77.0.0/24"
    assert c.gateway_ip == "10.77.0.1"
    assert c.guest_dns == ("9.9.9.9", "2620:fe::fe")
    assert c.auto_stop_stale_after == 7200
    assert c.stats_poll_interval == 30
    assert c.op_prune_interval == 120
    assert c.vm_defaults.vcpu.value == 2 and c.vm_defaults.vcpu.source == "config"
    assert c.vm_defaults.disk_size.value == 16 * GiB
    # sizes carry their unit
    assert c.vm_defaults.overlay_size.value == 4 * GiB
    assert c.file_sync[0].host == os.path.expanduser("~/.gitconfig")
    assert c.file_sync[0].mode == 0o644
    assert c.file_sync[1].guest == "/root/x/hostname"
    assert c.file_sync[1].mode == 0o600


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"nope": 1}, "nope"),
        ({"vm_defaults": {"cpus": 2}}, "vm_defaults.cpus"),
        (
            {"file_sync": [{"host": HOSTFILE, "guest": "/root/a", "owner": "x"}]},
            "file_sync[0].owner",
        ),
        ({"log_level": "loud"}, "log_level"),
        ({"log_level": 3}, "log_level"),
        ({"vmm": "kvmtool"}, "vmm"),
        ({"firecracker_bin": ""}, "firecracker_bin"),
        ({"qemu_bin": 7}, "qemu_bin"),
        ({"use_jailer": "yes"}, "use_jailer"),
        ({"bridge_name": "this-name-is-too-long"}, "bridge_name"),
        ({"bridge_name": "br stoker"}, "bridge_name"),
        ({"bridge_cidr": "8.8.8.0/24"}, "bridge_cidr"),
        ({"bridge_cidr": "not-a-cidr"}, "bridge_cidr"),
        ({"bridge_cidr": "10.0.0.0/30"}, "bridge_cidr"),
        ({"tap_pool_size": -1}, "tap_pool_size"),
        ({"tap_pool_size": 1000}, "tap_pool_size"),
        ({"tap_pool_size": True}, "tap_pool_size"),
        ({"tap_pool_size": 2.5}, "tap_pool_size"),
        ({"dns_listen": "localhost:53"}, "dns_listen"),
        ({"dns_listen": "127.0.0.1:0"}, "dns_listen"),
        ({"dns_listen": "127.0.0.1:99999"}, "dns_listen"),
        ({"dns_listen": "127.0.0.1"}, "dns_listen"),
        ({"guest_dns": []}, "guest_dns"),
        ({"guest_dns": "1.1.1.1"}, "guest_dns"),
        ({"guest_dns": ["one.one.one.one"]}, "guest_dns"),
        ({"guest_dns": [1]}, "guest_dns"),
        ({"auto_stop_stale_after": "soon"}, "auto_stop_stale_after"),
        ({"auto_stop_stale_after": -5}, "auto_stop_stale_after"),
        ({"auto_stop_stale_after": "1.5h"}, "auto_stop_stale_after"),
        ({"stats_poll_interval": "10 minutes"}, "stats_poll_interval"),
        ({"vm_defaults": 4}, "vm_defaults"),
        ({"vm_defaults": {"vcpu": "many"}}, "vm_defaults.vcpu"),
        ({"vm_defaults": {"vcpu": 0}}, "vm_defaults.vcpu"),
        ({"vm_defaults": {"vcpu": 65}}, "vm_defaults.vcpu"),
        ({"vm_defaults": {"vcpu": True}}, "vm_defaults.vcpu"),
        ({"vm_defaults": {"memory_mib": 64}}, "vm_defaults.memory_mib"),
        ({"vm_defaults": {"memory_mib": "2G"}}, "vm_defaults.memory_mib"),
        ({"vm_defaults": {"disk_size": "big"}}, "vm_defaults.disk_size"),
        ({"vm_defaults": {"disk_size": 0}}, "vm_defaults.disk_size"),
        ({"vm_defaults": {"disk_size": "-1G"}}, "vm_defaults.disk_size"),
        ({"vm_defaults": {"disk_size": "8Q"}}, "vm_defaults.disk_size"),
        ({"vm_defaults": {"disk_size": 1.5}}, "vm_defaults.disk_size"),
        ({"vm_defaults": {"overlay_size": [1]}}, "vm_defaults.overlay_size"),
        ({"file_sync": {"host": HOSTFILE}}, "file_sync"),
        ({"file_sync": ["x"]}, "file_sync[0]"),
        ({"file_sync": [{"host": HOSTFILE}]}, "file_sync[0]"),
        ({"file_sync": [{"host": "rel/path", "guest": "/root/a"}]}, "file_sync[0].host"),
        ({"file_sync": [{"host": HOSTFILE, "guest": "/etc/passwd"}]}, "file_sync[0].guest"),
        ({"file_sync": [{"host": HOSTFILE, "guest": "/rootkit"}]}, "file_sync[0].guest"),
        ({"file_sync": [{"host": HOSTFILE, "guest": "/root/../etc/x"}]}, "file_sync[0].guest"),
        ({"file_sync": [{"host": HOSTFILE, "guest": "root/a"}]}, "file_sync[0].guest"),
        (
            {
                "file_sync": [
                    {"host": HOSTFILE, "guest": "/root/a"},
                    {"host": HOSTFILE, "guest": "/root/b", "mode": "rw"},
                ]
            },
            "file_sync[1].mode",
        ),
        (
            {"file_sync": [{"host": HOSTFILE, "guest": "/root/a", "mode": 0o1777}]},
            "file_sync[0].mode",
        ),
    ],
)
def test_invalid_values_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, cpus=4, mem_bytes=8 * GiB)
    assert f"'{key}'" in ei.value.message, ei.value.message
    assert ei.value.code == "config_error"


def test_public_bridge_cidr_says_why() -> None:
    with pytest.raises(ConfigError, match="not a private range"):
        parse_config({"bridge_cidr": "8.8.8.0/24"})


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"brige_name": "x"})
    assert "bridge_name" in ei.value.message


def test_each_key_is_optional_alone() -> None:
    """Any single key may appear without the others."""
    samples: dict[str, Any] = {
        "log_level": "warning",
        "vmm": "firecracker",
        "tap_pool_size": 0,
        "guest_dns": ["1.1.1.1"],
        "vm_defaults": {},
        "file_sync": [],
        "auto_stop_stale_after": 0,
    }
    for k, v in samples.items():
        parse_config({k: v})


# --- [vm_defaults] provenance --------------------------------------------------------


def test_vm_defaults_from_host_heuristic() -> None:
    d = parse_config({}, cpus=8, mem_bytes=24 * GiB).vm_defaults
    assert (d.vcpu.value, d.vcpu.source) == (2, "host heuristic")
    assert (d.memory_mib.value, d.memory_mib.source) == (3072, "host heuristic")
    # no heuristic for disks: built-in
    assert (d.disk_size.value, d.disk_size.source) == (BUILTIN_DISK_SIZE, "built-in")
    assert (d.overlay_size.value, d.overlay_size.source) == (BUILTIN_OVERLAY_SIZE, "built-in")


def test_vm_defaults_heuristic_caps() -> None:
    d = parse_config({}, cpus=64, mem_bytes=512 * GiB).vm_defaults
    assert (d.vcpu.value, d.vcpu.source) == (4, "host heuristic")
    assert (d.memory_mib.value, d.memory_mib.source) == (8192, "host heuristic")


def test_vm_defaults_small_host_falls_back_to_builtin() -> None:
    d = parse_config({}, cpus=2, mem_bytes=4 * GiB).vm_defaults
    assert (d.vcpu.value, d.vcpu.source) == (BUILTIN_VCPU, "built-in")
    assert (d.memory_mib.value, d.memory_mib.source) == (BUILTIN_MEMORY_MIB, "built-in")


def test_vm_defaults_unknown_host_is_builtin() -> None:
    d = parse_config({}, cpus=0, mem_bytes=0).vm_defaults
    assert d.vcpu.source == "built-in" and d.memory_mib.source == "built-in"


def test_vm_defaults_config_beats_heuristic() -> None:
    d = parse_config(
        {"vm_defaults": {"vcpu": 1, "memory_mib": 512, "disk_size": "20G"}},
        cpus=64,
        mem_bytes=512 * GiB,
    ).vm_defaults
    assert (d.vcpu.value, d.vcpu.source) == (1, "config")
    assert (d.memory_mib.value, d.memory_mib.source) == (512, "config")
    assert (d.disk_size.value, d.disk_size.source) == (20 * GiB, "config")
    assert d.overlay_size.source == "built-in"


def test_vm_defaults_partial_config_mixes_sources() -> None:
    d = parse_config({"vm_defaults": {"memory_mib": 4096}}, cpus=16, mem_bytes=8 * GiB).vm_defaults
    assert (d.vcpu.value, d.vcpu.source) == (4, "host heuristic")
    assert (d.memory_mib.value, d.memory_mib.source) == (4096, "config")


# --- loading files -------------------------------------------------------------------


def test_load_missing_default_file_is_defaults(tmp_path: Path) -> None:
    c = load_config(tmp_path / "config.toml")
    assert c.path is None and c.vmm == "auto"


def test_load_missing_explicit_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", required=True)


def test_load_valid_file_keeps_path(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text(
        'vmm = "qemu"\n[vm_defaults]\nvcpu = 2\n[[file_sync]]\n'
        f'host = "{HOSTFILE}"\nguest = "/root/a"\n'
    )
    c = load_config(p)
    assert c.path == p
    assert c.vmm == "qemu"
    assert c.vm_defaults.vcpu.value == 2
    assert c.file_sync[0].guest == "/root/a"


def test_load_invalid_toml(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text("vmm = \n[[[")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_bytes(b'vmm = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in ei.value.message


def test_load_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_config(tmp_path)


def test_load_invalid_value_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text('[vm_defaults]\nvcpu = "many"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in ei.value.message
    assert "'vm_defaults.vcpu'" in ei.value.message


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    default = tmp_path / "default.toml"
    monkeypatch.delenv("STOKER_CONFIG", raising=False)
    assert config_path(None, default) == (default, False)
    monkeypatch.setenv("STOKER_CONFIG", str(tmp_path / "env.toml"))
    assert config_path(None, default) == (tmp_path / "env.toml", True)
    assert config_path(str(tmp_path / "flag.toml"), default) == (tmp_path / "flag.toml", True)


def test_stoker_config_env_pointing_to_missing_file_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STOKER_CONFIG", str(tmp_path / "missing.toml"))
    path, explicit = config_path(None, tmp_path / "default.toml")
    with pytest.raises(ConfigError, match=r"missing\.toml does not exist"):
        load_config(path, required=explicit)


# --- layout --------------------------------------------------------------------------


def test_user_layout_follows_xdg() -> None:
    env = {
        "HOME": "/home/u",
        "XDG_CONFIG_HOME": "/x/c",
        "XDG_STATE_HOME": "/x/s",
        "XDG_CACHE_HOME": "/x/k",
        "XDG_RUNTIME_DIR": "/run/user/1",
    }
    lay = Layout.resolve(env=env)
    assert lay.config_file == Path("/x/c/stoker/config.toml")
    assert lay.db_path == Path("/x/s/stoker/state.db")
    assert lay.oci_cache_dir == Path("/x/k/stoker/oci")
    assert lay.socket_path == Path("/run/user/1/stoker/stokerd.sock")
    assert not lay.system


def test_user_layout_defaults_and_relative_xdg_ignored() -> None:
    lay = Layout.resolve(env={"HOME": "/home/u", "XDG_CONFIG_HOME": "relative"})
    assert lay.config_dir == Path("/home/u/.config/stoker")
    assert lay.state_dir == Path("/home/u/.local/state/stoker")
    assert lay.cache_dir == Path("/home/u/.cache/stoker")
    # no runtime dir: the socket lives in the state dir
    assert lay.socket_path == Path("/home/u/.local/state/stoker/stokerd.sock")


def test_system_layout() -> None:
    for lay in (Layout.resolve(system=True, env={}), Layout.resolve(env={"STOKER_SYSTEM": "1"})):
        assert lay.system
        assert lay.config_file == Path("/etc/stoker/config.toml")
        assert lay.db_path == Path("/var/lib/stoker/state.db")
        assert lay.socket_path == Path("/run/stoker/stokerd.sock")


# --- issue 9 item 7: sizes and numbers in the config file ----------------------------------
# Old behaviour per case: "9"*400+"T" raised OverflowError out of ConfigError (stokerd died
# with a traceback); 99999999T, 20T and memory_mib 2**63 were accepted and failed at VM
# creation; overlay_size = "1" was 1 MiB; "٣G" parsed as 3G; a 5000-digit duration or
# integer raised ValueError from int().


@pytest.mark.parametrize(
    ("data", "key", "why"),
    [
        ({"vm_defaults": {"disk_size": "9" * 400 + "T"}}, "vm_defaults.disk_size", "not a size"),
        ({"vm_defaults": {"disk_size": "99999999T"}}, "vm_defaults.disk_size", "at most"),
        ({"vm_defaults": {"overlay_size": "20T"}}, "vm_defaults.overlay_size", "at most"),
        ({"vm_defaults": {"overlay_size": "1"}}, "vm_defaults.overlay_size", "has no unit"),
        ({"vm_defaults": {"overlay_size": 4096}}, "vm_defaults.overlay_size", "at least 256M"),
        ({"vm_defaults": {"disk_size": "\u0663G"}}, "vm_defaults.disk_size", "not a size"),
        ({"vm_defaults": {"disk_size": "100M"}}, "vm_defaults.disk_size", "at least 256M"),
        ({"vm_defaults": {"memory_mib": 2**63}}, "vm_defaults.memory_mib", "at most 8192"),
        ({"boot_timeout": "9" * 5000}, "boot_timeout", "expected a duration"),
        ({"boot_timeout": 10**30}, "boot_timeout", "longer than the maximum"),
        ({"auto_stop_stale_after": "\u0663h"}, "auto_stop_stale_after", "expected a duration"),
        ({"tap_pool_size": 10**5000}, "tap_pool_size", "out of range"),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else None,
)
def test_hostile_numbers_name_the_key(data: dict[str, Any], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, cpus=4, mem_bytes=8 * GiB)
    assert f"'{key}'" in ei.value.message and why in ei.value.message, ei.value.message
    assert len(ei.value.message) < 400


def test_huge_toml_integer_is_a_config_error(tmp_path: Path) -> None:
    """Old behaviour: tomllib's int() ValueError escaped load_config."""
    p = tmp_path / "config.toml"
    p.write_text("tap_pool_size = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_stokerd_with_a_bad_size_exits_without_a_traceback(tmp_path: Path) -> None:
    """Old behaviour: `stokerd` died at start with an OverflowError traceback."""
    import subprocess
    import sys

    cfg = tmp_path / "config.toml"
    cfg.write_text('[vm_defaults]\ndisk_size = "' + "9" * 400 + 'T"\n')
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "stoker.daemon.main", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "vm_defaults.disk_size" in r.stderr and r.stderr.startswith("stokerd: ")


def test_fifo_config_file_is_refused_without_blocking(tmp_path: Path) -> None:
    import signal

    p = tmp_path / "config.toml"
    os.mkfifo(p)
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("load_config blocked on a FIFO"))
    signal.alarm(5)
    try:
        with pytest.raises(ConfigError, match="is a FIFO, not a file"):
            load_config(p)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- issue 9 item 12: values accepted at load that were wrong later ------------------------


@pytest.fixture
def special_files(tmp_path: Path) -> dict[str, str]:
    import socket

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()
    (tmp_path / "dir").mkdir()
    return {
        "fifo": str(fifo),
        "socket": str(sock_path),
        "dir": str(tmp_path / "dir"),
        "missing": str(tmp_path / "missing"),
        "dev": "/dev/zero",
    }


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("fifo", "is a FIFO, not a regular file"),
        ("socket", "is a socket, not a regular file"),
        ("dir", "is a directory, not a regular file"),
        ("missing", "does not exist"),
        ("dev", "is a character device, not a regular file"),
    ],
)
def test_file_sync_host_must_be_a_regular_file(
    special_files: dict[str, str], kind: str, why: str
) -> None:
    """Old behaviour: accepted at load; at VM start a FIFO hung the daemon's event loop,
    /dev/zero read until OOM, a missing file failed the start."""
    ent = {"host": special_files[kind], "guest": "/root/x"}
    with pytest.raises(ConfigError) as ei:
        parse_config({"file_sync": [ent]})
    assert "'file_sync[0].host'" in ei.value.message and why in ei.value.message


def test_file_sync_host_symlink_to_a_file_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    c = parse_config({"file_sync": [{"host": str(tmp_path / "link"), "guest": "/root/x"}]})
    assert c.file_sync[0].host == str(tmp_path / "link")


def test_file_sync_host_too_large(tmp_path: Path) -> None:
    from stoker.config import FILE_SYNC_MAX_BYTES

    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(FILE_SYNC_MAX_BYTES + 1)
    with pytest.raises(ConfigError, match=r"'file_sync\[0\]\.host'.*at most 4 MiB"):
        parse_config({"file_sync": [{"host": str(big), "guest": "/root/x"}]})


@pytest.mark.parametrize(
    "guest",
    ["/root", "/root/", "/root/.", '/root/a"b', "/root/a\nb", "/root/a\x00b", "/root/a\rb"],
)
def test_file_sync_guest_must_be_a_file_under_root(guest: str) -> None:
    """Old behaviour: /root and /root/ were accepted (the sync then wrote over the work
    disk's root directory); '"', newline and NUL broke the debugfs command later."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"file_sync": [{"host": HOSTFILE, "guest": guest}]})
    assert "'file_sync[0].guest'" in ei.value.message


@pytest.mark.parametrize("mode", [400, 0o600, 600, "rw", "0800", "01777", "-600"])
def test_file_sync_mode_must_be_an_octal_string(mode: object) -> None:
    """Old behaviour: `mode = 400` (decimal) silently became 0o620."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"file_sync": [{"host": HOSTFILE, "guest": "/root/x", "mode": mode}]})
    assert "'file_sync[0].mode'" in ei.value.message and '"0600"' in ei.value.message


@pytest.mark.parametrize(("mode", "want"), [("0600", 0o600), ("400", 0o400), ("0o644", 0o644)])
def test_file_sync_mode_strings(mode: str, want: int) -> None:
    c = parse_config({"file_sync": [{"host": HOSTFILE, "guest": "/root/x", "mode": mode}]})
    assert c.file_sync[0].mode == want


@pytest.mark.parametrize("name", ["-br", "..", ".", "all", "default", "lo", "br/x", "br\u0663"])
def test_bridge_name_refused(name: str) -> None:
    """Old behaviour: "-br" (an option to ip/nft) and ".." were accepted."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"bridge_name": name})
    assert "'bridge_name'" in ei.value.message


# --- issue 10 item 5: keys declared once; README's key table and example follow them ----

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_section(begin: str, end: str) -> str:
    text = README.read_text()
    assert begin in text, f"README.md lost its {begin!r} marker"
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_readme_key_table_is_the_declared_keys() -> None:
    from stoker.config import settings_table

    got = _readme_section("<!-- settings-table: begin -->\n", "<!-- settings-table: end -->")
    assert got == settings_table(), (
        "README.md's config key table disagrees with the keys declared in stoker.config; "
        "paste this between the settings-table markers:\n" + settings_table()
    )


def test_readme_example_config_uses_declared_keys_with_valid_values() -> None:
    import tomllib

    from stoker.config import Config, FileSync, VMDefaults, declared

    block = README.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)
    top = {f.name for f in declared(Config)}
    assert set(data) <= top, set(data) - top
    assert set(data.get("vm_defaults", {})) <= {f.name for f in declared(VMDefaults)}
    for ent in data.get("file_sync", []):
        assert set(ent) <= {f.name for f in declared(FileSync)}
        ent["host"] = HOSTFILE  # the example's ~/.netrc need not exist here
    parse_config(data, cpus=4, mem_bytes=8 * GiB)


def test_known_keys_are_the_declared_fields() -> None:
    """The unknown-key message lists exactly the declared keys (none hand-listed)."""
    from stoker.config import Config, declared

    with pytest.raises(ConfigError) as ei:
        parse_config({"nope": 1})
    listed = ei.value.message.split("known keys: ", 1)[1].rstrip(")").split(", ")
    assert listed == sorted(f.name for f in declared(Config))
    assert "path" not in listed  # a Config field that is not a key


def test_declared_defaults_are_what_an_empty_config_gives() -> None:
    from stoker.config import Config, declared

    c = parse_config({}, cpus=0, mem_bytes=0)
    for f in declared(Config):
        if f.name != "vm_defaults":
            assert getattr(c, f.name) == f.default, f.name
    for f in declared(type(c.vm_defaults)):
        assert getattr(c.vm_defaults, f.name) == f.default  # built-in, source "built-in"
