"""Contract test: every request the Firecracker driver sends is valid for the published API.

Reads the Firecracker OpenAPI (swagger 2.0) specs from ../shared/firecracker (skipped
when absent) and validates each body of `api_requests` against the schema the spec gives
for that method and path, resolving `$ref`s into `#/definitions`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from prereq import require
from stoker.daemon.vmm.base import Disk, MachineConfig
from stoker.daemon.vmm.firecracker import (
    LOAD_FIELDS_SINCE,
    ApiRequest,
    VMMView,
    api_requests,
    logging_requests,
    parse_version,
    pause_request,
    resume_request,
    snapshot_create_request,
    snapshot_load_request,
)

pytestmark = pytest.mark.unit

try:  # dev dependencies (pip install -e '.[dev]'); CI has them
    import jsonschema
    import yaml
except ImportError as e:
    require(False, f"{e.name} is not installed (pip install -e '.[dev]')")

SPEC_DIR = Path(
    os.environ.get(
        "STOKER_FIRECRACKER_SPECS",
        Path(__file__).resolve().parents[2].parent / "shared/firecracker",
    )
)
SPECS = ("firecracker-api-v1.12.1.yaml", "firecracker-api-v1.16.1.yaml")


def load_spec(name: str) -> dict[str, Any]:
    path = SPEC_DIR / name
    require(path.exists(), f"Firecracker API spec {path} is not available (../shared)")
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    return spec


def body_schema(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The body schema of the operation matching a concrete path like /drives/rootfs."""
    for template, ops in spec["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            op = ops[method.lower()]
            for param in op.get("parameters", []):
                if param.get("in") == "body":
                    schema: dict[str, Any] = param["schema"]
                    return schema
            raise AssertionError(f"{method} {template} takes no body in the spec")
    raise AssertionError(f"{method} {path} is not an operation of the Firecracker API")


def strict(node: Any) -> Any:
    """Forbid keys the spec does not name (Firecracker's server rejects unknown fields; the
    spec only leaves `additionalProperties` open), so a misspelt key fails here too."""
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    # Swagger 2.0 schemas are draft-4 JSON Schema; `$ref`s point into #/definitions.
    full = strict({**schema, "definitions": spec["definitions"]})
    cls = jsonschema.Draft4Validator
    return cls(full, format_checker=jsonschema.FormatChecker())


def config(tmp_path: Path, **kw: Any) -> MachineConfig:
    base: dict[str, Any] = dict(
        vm_id="0123abcd",
        name="t1",
        vm_dir=tmp_path,
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        cmdline="console=ttyS0 reboot=k panic=-1 root=/dev/vda ro",
        vcpu=2,
        memory_mib=1024,
        disks=[
            Disk(tmp_path / "rootfs.ext4", True, "rootfs"),
            Disk(tmp_path / "overlay.ext4", False, "overlay"),
            Disk(tmp_path / "work.ext4", False, "work"),
        ],
        tap="tap-stk0",
        mac="06:00:ac:1e:00:02",
        serial_log=tmp_path / "serial.log",
        vsock_cid=7,
        agent_socket=tmp_path / "agent.sock",
    )
    base.update(kw)
    return MachineConfig(**base)


def view(cfg: MachineConfig, initrd: bool = True, vsock: bool = True) -> VMMView:
    return VMMView(
        kernel=str(cfg.kernel),
        initrd=str(cfg.initrd) if initrd and cfg.initrd else None,
        disks=[(d, str(d.path)) for d in cfg.disks],
        log=str(cfg.vm_dir / "firecracker.log"),
        metrics=str(cfg.vm_dir / "firecracker.metrics"),
        vsock_uds=str(cfg.agent_socket) if vsock and cfg.agent_socket else None,
    )


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("variant", ["full", "minimal"])
def test_every_request_body_validates(tmp_path: Path, spec_name: str, variant: str) -> None:
    spec = load_spec(spec_name)
    if variant == "full":
        cfg = config(tmp_path)
        reqs = api_requests(cfg, view(cfg))
    else:
        cfg = config(tmp_path, initrd=None, tap=None, vsock_cid=None, agent_socket=None, vcpu=1)
        reqs = api_requests(cfg, view(cfg, initrd=False, vsock=False))
    assert reqs, "the driver sends no configuration"
    for req in reqs:
        errors = list(
            validator(spec, body_schema(spec, req.method, req.path)).iter_errors(req.body)
        )
        assert not errors, f"{req.method} {req.path} {req.body}: {[e.message for e in errors]}"


def test_sequence_covers_every_concern_and_ends_with_instance_start(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    reqs = api_requests(cfg, view(cfg))
    paths = [r.path for r in reqs]
    assert paths == [
        "/logger",
        "/metrics",
        "/boot-source",
        "/drives/rootfs",
        "/drives/overlay",
        "/drives/work",
        "/network-interfaces/eth0",
        "/machine-config",
        "/vsock",
        "/actions",
    ]
    assert all(r.method == "PUT" for r in reqs)
    assert reqs[-1].body == {"action_type": "InstanceStart"}
    drives = [r.body for r in reqs if r.path.startswith("/drives/")]
    # Disk order is the guest's vda, vdb, vdc; root= comes from our command line only.
    assert [(d["drive_id"], d["is_read_only"], d["is_root_device"]) for d in drives] == [
        ("rootfs", True, False),
        ("overlay", False, False),
        ("work", False, False),
    ]
    boot = next(r.body for r in reqs if r.path == "/boot-source")
    assert boot["boot_args"] == cfg.cmdline and boot["initrd_path"] == str(cfg.initrd)
    assert all(r.hint for r in reqs), "every refusal needs a what-to-do hint"


def test_spec_rejects_a_bad_body(tmp_path: Path) -> None:
    """The validator is not vacuous: a body the spec forbids is caught."""
    spec = load_spec(SPECS[0])
    schema = body_schema(spec, "PUT", "/machine-config")
    errors = list(validator(spec, schema).iter_errors({"vcpu_count": 0, "mem_size_mib": "1G"}))
    assert len(errors) == 2
    schema = body_schema(spec, "PUT", "/actions")
    assert list(validator(spec, schema).iter_errors({"action_type": "Reboot"}))
    schema = body_schema(spec, "PUT", "/drives/rootfs")
    misspelt = {"drive_id": "x", "is_root_device": False, "is_readonly": True}
    assert list(validator(spec, schema).iter_errors(misspelt))


def spec_version(spec: dict[str, Any]) -> tuple[int, int, int]:
    v = parse_version(str(spec["info"]["version"]))
    assert v is not None
    return v


def snapshot_requests(
    cfg: MachineConfig, v: VMMView, version: tuple[int, int, int] | None
) -> list[ApiRequest]:
    """Everything the driver sends for a snapshot and a restore, in order."""
    return [
        pause_request(),
        snapshot_create_request("/snapshot.state", "/snapshot.mem", cfg.vm_dir),
        resume_request(),
        *logging_requests(v),
        snapshot_load_request(cfg, v, "/snapshot.state", "/snapshot.mem", version, "s1"),
    ]


def errors_of(spec: dict[str, Any], req: ApiRequest) -> list[str]:
    v = validator(spec, body_schema(spec, req.method, req.path))
    return [e.message for e in v.iter_errors(req.body)]


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("variant", ["full", "minimal"])
def test_every_snapshot_request_validates_against_its_version(
    tmp_path: Path, spec_name: str, variant: str
) -> None:
    """The bodies the driver sends to a Firecracker of the spec's version are that spec's."""
    spec = load_spec(spec_name)
    if variant == "full":
        cfg = config(tmp_path)
        reqs = snapshot_requests(cfg, view(cfg), spec_version(spec))
    else:
        cfg = config(tmp_path, initrd=None, tap=None, vsock_cid=None, agent_socket=None, vcpu=1)
        reqs = snapshot_requests(cfg, view(cfg, initrd=False, vsock=False), spec_version(spec))
    for req in reqs:
        errs = errors_of(spec, req)
        assert not errs, f"{req.method} {req.path} {req.body}: {errs}"
        assert req.hint


def test_load_sends_what_the_version_has(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    old, new = (load_spec(n) for n in SPECS)
    v_old, v_new = spec_version(old), spec_version(new)
    load_old = snapshot_load_request(cfg, view(cfg), "/s", "/m", v_old, "s1")
    load_new = snapshot_load_request(cfg, view(cfg), "/s", "/m", v_new, "s1")
    assert load_old.body == {
        "snapshot_path": "/s",
        "mem_backend": {"backend_type": "File", "backend_path": "/m"},
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-stk0"}],
    }
    assert load_new.body == {
        **load_old.body,
        "vsock_override": {"uds_path": str(cfg.agent_socket)},
        "clock_realtime": True,
    }
    assert "snapshot s1 could not be loaded" in load_old.hint
    # The gating is needed: v1.12.1's API has no such fields (its server refuses them).
    assert errors_of(old, load_new), "the old spec must refuse the newer fields"
    props = old["definitions"]["SnapshotLoadParams"]["properties"]
    for f in LOAD_FIELDS_SINCE:
        assert f not in props
        assert f in new["definitions"]["SnapshotLoadParams"]["properties"]
    # An unknown version gets only the fields every version has.
    assert snapshot_load_request(cfg, view(cfg), "/s", "/m", None, "s1").body == load_old.body
    # No NIC: no override; no vsock: no vsock override.
    bare = config(tmp_path, tap=None, vsock_cid=None, agent_socket=None)
    body = snapshot_load_request(bare, view(bare, vsock=False), "/s", "/m", v_new, "s1").body
    assert "network_overrides" not in body and "vsock_override" not in body


def test_create_is_a_full_snapshot_between_pause_and_resume(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    reqs = snapshot_requests(cfg, view(cfg), (1, 12, 1))
    assert [(r.method, r.path) for r in reqs[:3]] == [
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PATCH", "/vm"),
    ]
    assert reqs[0].body == {"state": "Paused"} and reqs[2].body == {"state": "Resumed"}
    assert reqs[1].body == {
        "snapshot_type": "Full",
        "snapshot_path": "/snapshot.state",
        "mem_file_path": "/snapshot.mem",
    }
