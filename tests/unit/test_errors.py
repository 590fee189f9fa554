"""The error registry: every class with a code joins it, and the client rebuilds them all."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stoker import errors

pytestmark = pytest.mark.unit

SRC = Path(errors.__file__).resolve().parent


def _classes_with_codes() -> dict[str, tuple[str, str]]:
    """code -> (module, class name) for every class in src/ that sets `code = "..."`."""
    found: dict[str, tuple[str, str]] = {}
    for py in SRC.rglob("*.py"):
        mod = ".".join(("stoker", *py.relative_to(SRC).with_suffix("").parts))
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for st in node.body:
                if (
                    isinstance(st, ast.Assign)
                    and [getattr(t, "id", None) for t in st.targets] == ["code"]
                    and isinstance(st.value, ast.Constant)
                    and isinstance(st.value.value, str)
                ):
                    assert st.value.value not in found, f"code {st.value.value} defined twice"
                    found[st.value.value] = (mod, node.name)
    return found


def test_every_leaf_error_module_is_listed() -> None:
    """A leaf error class in a module the client does not know would come back as a plain
    StokerError; adding one means adding its module to LEAF_ERROR_MODULES."""
    found = _classes_with_codes()
    assert {"oci_unsafe_layer", "bundle_unsafe", "host_key_mismatch", "store_busy"} <= set(found)
    for code, (mod, name) in found.items():
        assert mod == "stoker.errors" or mod in errors.LEAF_ERROR_MODULES, (code, mod, name)


def test_client_rebuilds_leaf_errors_in_a_fresh_process() -> None:
    """Old behaviour (issue 10 item 5): `oci_*`, `bundle_*` and `host_key_mismatch` came
    back from `error_from_code` as a plain StokerError whose code was "internal".

    A fresh interpreter, as the CLI is: it has imported none of the leaf modules."""
    found = _classes_with_codes()
    prog = (
        "import json, sys\n"
        "from stoker.errors import error_from_code\n"
        "out = {}\n"
        "for code in json.loads(sys.argv[1]):\n"
        "    e = error_from_code(code, 'msg', 'det')\n"
        "    out[code] = [type(e).__module__, type(e).__name__, e.code, e.message, e.detail]\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", prog, json.dumps(sorted(found))],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(r.stdout)
    for code, (mod, name) in found.items():
        assert got[code] == [mod, name, code, "msg", "det"], code


def test_unknown_code_keeps_its_code() -> None:
    e = errors.error_from_code("some_future_code", "m")
    assert type(e) is errors.StokerError and e.code == "some_future_code"
    assert errors.StokerError("x").code == "internal"  # the class attribute is untouched


def test_duplicate_code_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match=r"already used by stoker\.errors\.NotFound"):

        class Clash(errors.StokerError):  # pragma: no cover - never created
            code = "not_found"

    assert errors.ERROR_CLASSES["not_found"] is errors.NotFound


def test_subclass_without_code_inherits_and_does_not_register() -> None:
    from stoker.rpc.client import DaemonNotRunning

    assert DaemonNotRunning.code == "unavailable"
    assert errors.ERROR_CLASSES["unavailable"] is errors.Unavailable
