"""Every RPC method's service returns a declared shape, and the declarations agree.

- The service methods behind `Daemon.methods()` are annotated to return dataclasses
  (`model.records`, `model.wire`), never `dict` / `Any`.
- Each of those dataclasses has its client-side JSON declaration in `rpc.shapes` (a
  `TypedDict` of the same name) with the same keys; "present when" fields are `NotRequired`.
- docs/json-output.md lists the fields of every read command's shape, and every time the
  daemon prints is the one documented format.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from stoker.model import records, wire
from stoker.rpc import shapes
from stoker.rpc.server import RequestContext
from stoker.store.db import now

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs" / "json-output.md"


def _hints(fn: Any) -> dict[str, Any]:
    """The evaluated return annotation of a (bound, partial) function, as {"return": T}.
    Only the return is evaluated: parameters may name TYPE_CHECKING-only types."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    ret = fn.__annotations__.get("return")
    if ret is None:
        return {}
    return {"return": eval(ret, fn.__globals__) if isinstance(ret, str) else ret}


def _bad(tp: Any) -> list[str]:
    """What in a return annotation is `Any` or a dict (each place, as text)."""
    if tp is Any:
        return ["Any"]
    origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        return [str(tp)]
    return [b for a in typing.get_args(tp) for b in _bad(a)]


def _dataclasses_in(tp: Any) -> set[type]:
    """The dataclasses a return annotation is made of (through list, unions, FanResult)."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return {tp}
    origin = typing.get_origin(tp)
    out: set[type] = set()
    if origin is not None and dataclasses.is_dataclass(origin):
        out.add(origin)
    for a in typing.get_args(tp):
        out |= _dataclasses_in(a)
    return out


def ctx() -> RequestContext:
    return RequestContext(peer_uid=0, peer_pid=0)


def test_every_rpc_method_returns_a_declared_shape(daemon_factory: Any) -> None:
    table = daemon_factory().methods()
    offenders, untyped = [], []
    for name, m in sorted(table.items()):
        assert m.fn is not None, f"{name} is not served by a service method (use route())"
        ret = _hints(m.fn).get("return")
        if ret is None:
            untyped.append(name)
        elif _bad(ret):
            offenders.append(f"{name} -> {ret}")
    assert untyped == [] and offenders == []


def test_the_check_catches_a_dict_result() -> None:
    async def bad(ref: str) -> list[dict[str, Any]]:
        return []

    async def worse(ref: str) -> Any:
        return None

    assert _bad(_hints(bad)["return"]) and _bad(_hints(worse)["return"])
    assert not _bad(_hints(test_the_check_catches_a_dict_result)["return"])


def _shape_keys(td: Any) -> tuple[set[str], set[str]]:
    return set(td.__required_keys__), set(td.__optional_keys__)


def _wire_keys(cls: type) -> tuple[set[str], set[str]]:
    """(always present, present when set) JSON keys of a result dataclass."""
    if cls is wire.FanResult:
        return {"ref", "ok", "error"}, {"result"}
    if cls is wire.ExecDone:
        return {"transport"}, {f.name for f in dataclasses.fields(cls)} - {"transport"}
    if cls in (wire.VMShown, wire.VMCreated):
        rec = {f.name for f in dataclasses.fields(records.VMRecord)}
        return rec | {f.name for f in dataclasses.fields(cls)} - {"record"}, set()
    always, when = set(), set()
    for f in dataclasses.fields(cls):
        (when if f.metadata.get("omit_if_none") else always).add(f.name)
    return always, when


def _result_classes(daemon_factory: Any) -> set[type]:
    out: set[type] = set()
    for m in daemon_factory().methods().values():
        out |= _dataclasses_in(_hints(m.fn).get("return"))
    # what those hold (nested shapes: spec, agent, network, ...)
    todo = list(out)
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls).get(f.name)
            for sub in _dataclasses_in(hint) - out:
                out.add(sub)
                todo.append(sub)
    return out


def test_each_result_has_its_client_shape_with_the_same_keys(daemon_factory: Any) -> None:
    classes = _result_classes(daemon_factory)
    assert {wire.VMStats, wire.GuestPort, records.VMRecord, wire.DaemonStatus} <= classes
    missing, differ = [], []
    for cls in sorted(classes, key=lambda c: c.__name__):
        td = getattr(shapes, cls.__name__, None)
        if td is None:
            missing.append(cls.__name__)
            continue
        if _shape_keys(td) != _wire_keys(cls):
            differ.append(f"{cls.__name__}: {_shape_keys(td)} != {_wire_keys(cls)}")
    assert missing == [] and differ == []


def _section(text: str, marker: str) -> str:
    """The doc text from `marker` to the next heading (or the next list item, for a
    marker that starts one)."""
    i = text.index(marker)
    end = len(text)
    for stop in ("\n#", "\n- ") if marker.startswith("- ") else ("\n#",):
        j = text.find(stop, i + len(marker))
        if j != -1:
            end = min(end, j)
    return text[i:end]


# Each read command's --json document: where docs/json-output.md describes it, and the
# shapes whose every key must be named there.
READ_COMMANDS: list[tuple[str, list[Any]]] = [
    ("### VM (", [shapes.VMRecord, shapes.VMSpec, shapes.Workspace, shapes.Teardown]),
    ("### Image (", [shapes.Image]),
    ("### Kernel (", [shapes.Kernel, shapes.AvailableKernel]),
    ("### Per-VM results", [shapes.FanResult]),
    ("- `stoker daemon status --json`", [shapes.DaemonStatus, shapes.NetworkStatus]),
    ("- `stoker vm workspace prepare --json`", [shapes.Workspace]),
    ("- `stoker vm workspace export --json`", [shapes.ChangedFile]),
    ("- `stoker image cache prune --json`", [shapes.CachePruned]),
    ("- `stoker image push NAME REF --json`", [shapes.Pushed]),
    ("- `stoker vm port-forward NAME", [shapes.PortForwardInfo]),
    ("- `stoker vm snapshot list", [shapes.SnapshotInfo]),
    ("## `stoker vm stats", [shapes.VMStats]),
    ("## `stoker vm ports", [shapes.GuestPort]),
    ("## `stoker vm health", [shapes.VMHealth, shapes.AgentHealth]),
]


@pytest.mark.parametrize(("marker", "tds"), READ_COMMANDS, ids=[m for m, _ in READ_COMMANDS])
def test_docs_list_every_field_of_each_read_command(marker: str, tds: list[Any]) -> None:
    section = _section(DOCS.read_text(), marker)
    missing = [
        f"{td.__name__}.{k}"
        for td in tds
        for k in td.__annotations__
        if f"`{k}`" not in section and not (k == "vm_id" and "`vm`" in section)
    ]
    assert missing == [], f"docs/json-output.md, {marker!r} does not name {missing}"


def test_vm_show_and_create_extras_are_documented() -> None:
    section = _section(DOCS.read_text(), "### VM (")
    for k in ("port_forwards", "timings", "expires_at"):
        assert f"`{k}`" in section


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _times(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every `*_at` value in a JSON document (meta's free-form facts excepted)."""
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "meta":
                continue
            if k.endswith("_at") and v is not None:
                out.append((f"{path}.{k}", v))
            out += _times(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _times(v, f"{path}[{i}]")
    return out


def _image(d: Any, ts: str) -> None:
    d.store.upsert_image(
        records.Image(
            name="img",
            managed=False,
            rootfs="/nonexistent/rootfs.ext4",
            work_seed=None,
            kernel=None,
            source="register:/nonexistent",
            size=0,
            created_at=ts,
        )
    )


async def test_one_time_format_in_what_the_daemon_prints(daemon_factory: Any) -> None:
    assert "RFC 3339 in UTC with microseconds and a `Z`" in DOCS.read_text()
    d = daemon_factory()
    ts = now()
    _image(d, ts)
    vm_dir = d.layout.vms_dir / "v1"
    vm_dir.mkdir(parents=True)
    d.store.insert_vm(
        records.VMRecord(
            id="a" * 32,
            name="t1",
            state=records.VMState.STOPPED,
            image="img",
            spec=records.VMSpec(vcpu=1, memory_mib=128, disk_size=1 << 20, overlay_size=1 << 20),
            guest_ip="172.30.0.9",
            dns_name="t1.vm",
            vm_dir=str(vm_dir),
            created_at=ts,
            updated_at=ts,
            started_at=ts,
            expires_at=ts,
            workspace=records.Workspace("/root/repo", "/src", "abc", prepared_at=ts),
        )
    )
    d.store.set_vm_expiry("a" * 32, ts)
    d.store.put_stats("a" * 32, {"sampled_at": ts, "uptime_s": 5.0})
    docs = [
        await d.dispatch("vm.list", {}, ctx()),
        await d.dispatch("vm.show", {"ref": "t1"}, ctx()),
        await d.dispatch("vm.stats", {"refs": ["t1"]}, ctx()),
        await d.dispatch("daemon.status", {}, ctx()),
        await d.dispatch("image.list", {}, ctx()),
        await d.dispatch("kernel.list", {}, ctx()),
    ]
    found = _times(docs)
    keys = {p.rsplit(".", 1)[1] for p, _ in found}
    assert {"created_at", "updated_at", "started_at", "expires_at", "prepared_at"} <= keys
    assert {"sampled_at", "last_sampled_at"} <= keys
    wrong = [(p, v) for p, v in found if not (isinstance(v, str) and RFC3339.match(v))]
    assert wrong == []


async def test_stats_json_has_no_private_keys(daemon_factory: Any) -> None:
    d = daemon_factory()
    ts = now()
    _image(d, ts)
    vm_dir = d.layout.vms_dir / "v2"
    vm_dir.mkdir(parents=True)
    d.store.insert_vm(
        records.VMRecord(
            id="b" * 32,
            name="t2",
            state=records.VMState.STOPPED,
            image="img",
            spec=records.VMSpec(vcpu=1, memory_mib=128, disk_size=1 << 20, overlay_size=1 << 20),
            guest_ip="172.30.0.10",
            dns_name="t2.vm",
            vm_dir=str(vm_dir),
            created_at=ts,
            updated_at=ts,
        )
    )
    (r,) = await d.dispatch("vm.stats", {"refs": ["t2"]}, ctx())
    assert r["ok"] and not [k for k in r["result"] if k.startswith("_")]
    assert set(r["result"]) <= set(shapes.VMStats.__annotations__)
    assert list(r["result"])[:5] == [
        "name",
        "state",
        "sampled_at",
        "overlay_bytes",
        "work_disk_bytes",
    ]
    assert isinstance(d.vm.last_samples["b" * 32].stats, wire.VMStats)
    # an unknown name: the per-VM result has no `result` key (docs: absent when unresolved)
    (miss,) = await d.dispatch("vm.stats", {"refs": ["nope"]}, ctx())
    assert miss["ok"] is False and "result" not in miss and "not found" in miss["error"]


def test_shapes_module_is_cheap() -> None:
    """The CLI imports rpc.shapes / rpc.facade on every command: typing only."""
    import subprocess
    import sys

    code = (
        "import sys, stoker.rpc.facade, stoker.rpc.shapes; "
        "print(sorted(m for m in ('dataclasses', 'inspect', 'stoker.model.records', "
        "'stoker.daemon') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_union_types_are_walked() -> None:
    assert _dataclasses_in(list[wire.VMStats] | None) == {wire.VMStats}
    assert _dataclasses_in(types.NoneType) == set()
