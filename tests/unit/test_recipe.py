"""stoker.toml parsing/validation, derived-image cache keys and cycle checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.daemon.imagemgr import derived
from stoker.daemon.imagemgr.derived import SetupStep
from stoker.errors import InvalidArgument
from stoker.model.records import Image
from stoker.recipe import RecipeError, key_line, load_recipe, parse_recipe

pytestmark = pytest.mark.unit

GOOD = """\
# a C repo
[image]
from = "debian-bookworm"
packages = ["make", "gcc"]
setup = ["echo one", "echo two"]

[vm]
vcpu = 2
memory = "2G"
disk_size = "4G"
nat = true
"""


def parse(text: str, tmp: Path | None = None) -> object:
    p = (tmp or Path("/r")) / "stoker.toml"
    return parse_recipe(text, p, tmp or Path("/r"))


def test_full_recipe() -> None:
    r = parse_recipe(GOOD, Path("/r/stoker.toml"))
    assert r.image_from == "debian-bookworm"
    assert r.packages == ("make", "gcc")
    assert r.setup == ("echo one", "echo two")
    assert r.vm.vcpu == 2 and r.vm.memory_mib == 2048 and r.vm.nat is True
    assert r.vm.disk_size == 4 * 1024**3
    bp = r.build_params()
    assert bp["packages"] == ["make", "gcc"] and bp["repo"] == "/r"
    assert [s["script"] for s in bp["setup"]] == ["echo one", "echo two"]


def test_every_key_optional() -> None:
    r = parse_recipe("", Path("/r/stoker.toml"))
    assert r.image_from == "debian-bookworm" and not r.has_image
    r = parse_recipe("[vm]\nvcpu = 1\n", Path("/r/stoker.toml"))
    assert r.vm.vcpu == 1 and r.vm.memory_mib is None


@pytest.mark.parametrize(
    ("text", "where", "line", "words"),
    [
        ('[image]\nfrom = "x"\npackges = ["make"]\n', "image.packges", 3, "unknown key"),
        ('[image]\npackages = "make"\n', "image.packages", 2, "list of strings"),
        ('[image]\npackages = ["Make!"]\n', "image.packages", 2, "Debian package name"),
        ('\n\n[vm]\nvcpu = "two"\n', "vm.vcpu", 4, "integer"),
        ("[vm]\nvcpu = 0\n", "vm.vcpu", 2, "out of range"),
        ("[vm]\nmemory = 64\n", "vm.memory", 2, "out of range"),
        ('[vm]\nnat = "yes"\n', "vm.nat", 2, "true or false"),
        ('[vm]\ndisk_size = "lots"\n', "vm.disk_size", 2, "not a size"),
        ('[image]\nsetup = ["ok", "  "]\n', "image.setup", 2, "empty"),
        ('[images]\nfrom = "x"\n', "images", 1, "unknown table"),
        ("[image]\nfrom = 3\n", "image.from", 2, "string"),
        ('[image]\nfrom = "bad name with spaces"\n', "image.from", 2, "not an image"),
        ("[vm]\nnet = 3\n", "vm.net", 2, "expected a string"),
        ('[vm]\nnet = "internet"\n', "vm.net", 2, "internet"),
        ('[vm]\nnat = true\nnet = "nat"\n', "vm.net", 3, "not both"),
        ('[image]\ncopy = "x:/y"\n', "image.copy", 2, "list of strings"),
        ('[image]\ncopy = ["x"]\n', "image.copy", 2, "REPO-FILE:GUEST-PATH"),
        ('[image]\ncopy = ["x:/proc/y"]\n', "image.copy", 2, "under /proc"),
    ],
)
def test_errors_name_file_key_and_line(text: str, where: str, line: int, words: str) -> None:
    with pytest.raises(RecipeError) as ei:
        parse_recipe(text, Path("/r/stoker.toml"))
    msg = ei.value.message
    assert msg.startswith("/r/stoker.toml: ")
    assert f"{where} (line {line})" in msg, msg
    assert words in msg


def test_invalid_toml_is_reported_with_file() -> None:
    with pytest.raises(RecipeError, match=r"/r/stoker.toml: not valid TOML"):
        parse_recipe("[image\n", Path("/r/stoker.toml"))


def test_key_line_scan_handles_quotes_comments_and_dotted_keys() -> None:
    text = '# [vm]\n[ "image" ]  # c\n"packages" = []\n[vm]\npackages = 1\n'
    assert key_line(text, "image", "packages") == 3
    assert key_line(text, "vm", "packages") == 5
    assert key_line("image.from = 'x'\n", "image", "from") == 1
    assert key_line(text, "vm", None) == 4


def test_inputs_are_hashed_and_confined(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("a==1\n")
    r = parse_recipe('[image]\ninputs = ["requirements.txt"]\n', tmp_path / "stoker.toml")
    assert r.inputs[0][0] == "requirements.txt" and len(r.inputs[0][1]) == 64
    for bad in ("../x", "/etc/passwd", "missing.txt"):
        with pytest.raises(RecipeError, match=r"image\.inputs \(line 2\)"):
            parse_recipe(f'[image]\ninputs = ["{bad}"]\n', tmp_path / "stoker.toml")
    (tmp_path / "link").symlink_to("/etc/hostname")
    with pytest.raises(RecipeError, match="outside the repo"):
        parse_recipe('[image]\ninputs = ["link"]\n', tmp_path / "stoker.toml")


def test_load_recipe_missing_and_required(tmp_path: Path) -> None:
    assert load_recipe(tmp_path) is None
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path, required=True)
    (tmp_path / "stoker.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path)


# --- cache keys ---------------------------------------------------------------------------


def test_key_is_stable_and_package_order_free() -> None:
    a = derived.recipe_key("digest:x", ["make", "gcc"])
    assert a == derived.recipe_key("digest:x", ["gcc", "make", "gcc"])
    assert a != derived.recipe_key("digest:y", ["make", "gcc"])
    assert a != derived.recipe_key("digest:x", ["make"])


def test_key_covers_setup_text_and_order_copies_and_inputs() -> None:
    s1, s2 = SetupStep("a", "echo 1"), SetupStep("b", "echo 2")
    base = derived.recipe_key("p", setup=[s1, s2])
    assert base == derived.recipe_key("p", setup=[SetupStep("other label", "echo 1"), s2])
    assert base != derived.recipe_key("p", setup=[s2, s1])
    assert base != derived.recipe_key("p", setup=[s1, SetupStep("b", "echo 3")])
    c1 = derived.CopyItem("/h/f", "/etc/f", "0" * 64)
    c2 = derived.CopyItem("/h/f", "/etc/f", "1" * 64)
    assert derived.recipe_key("p", copies=[c1]) != derived.recipe_key("p", copies=[c2])
    assert derived.recipe_key("p", inputs=[("r.txt", "a")]) != derived.recipe_key(
        "p", inputs=[("r.txt", "b")]
    )


def test_key_covers_builder_version(monkeypatch: pytest.MonkeyPatch) -> None:
    a = derived.recipe_key("p", ["make"])
    monkeypatch.setattr(derived, "DERIVED_BUILDER_VERSION", derived.DERIVED_BUILDER_VERSION + 1)
    assert derived.recipe_key("p", ["make"]) != a


def _img(name: str, parent: str | None = None, **kw: object) -> Image:
    return Image(
        name=name,
        managed=True,
        rootfs="/x",
        work_seed=None,
        kernel="k",
        source="derived:x",
        size=1,
        created_at="t",
        parent=parent,
        **kw,  # type: ignore[arg-type]
    )


def test_identity_prefers_recipe_then_digest() -> None:
    assert derived.image_identity(_img("a", recipe_hash="r")) == "recipe:r"
    assert derived.image_identity(_img("a", digest="d")) == "digest:d"
    assert derived.image_identity(_img("a")).startswith("derived:x@t")


def test_cycles_refused() -> None:
    images = {"a": _img("a", "b"), "b": _img("b", "debian-bookworm")}
    derived.check_no_cycle(images, "c", "a")  # fine: c is new
    with pytest.raises(InvalidArgument, match=r"cycle of derived images \(b -> a -> b\)"):
        derived.check_no_cycle(images, "b", "a")
    with pytest.raises(InvalidArgument, match="cycle"):
        derived.check_no_cycle(images, "a", "a")
    # A loop already in the records does not hang the walk.
    looped = {"x": _img("x", "y"), "y": _img("y", "x")}
    assert derived.parent_chain(looped, "x") == ["x", "y"]


def test_package_names_validated() -> None:
    assert derived.validate_packages(["gcc", "libc6-dev:amd64", "make=4.3-4.1", "gcc"]) == (
        "gcc",
        "libc6-dev:amd64",
        "make=4.3-4.1",
    )
    for bad in ("", "Gcc", "a", "x;rm -rf /", "-o"):
        with pytest.raises(InvalidArgument, match="not a Debian package name"):
            derived.validate_packages([bad])


# --- CLI: image build / vm run params -----------------------------------------------------


def _build_args(*argv: str) -> object:
    from stoker.cli.main import build_parser

    return build_parser("image", "build").parse_args(["image", "build", *argv])


def test_cli_build_params_from_flags(tmp_path: Path) -> None:
    from stoker.cli.envs import build_params

    script = tmp_path / "setup.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    a = _build_args("cdev", "--packages", "make, gcc", "--setup", str(script), "--setup", "ls")
    p = build_params(a)  # type: ignore[arg-type]
    assert p is not None
    assert p["name"] == "cdev" and p["from_image"] == "debian-bookworm"
    assert p["packages"] == ["make", "gcc"]
    assert p["setup"][0]["script"] == "#!/bin/sh\necho hi\n"  # a file's content runs
    assert p["setup"][1]["script"] == "ls"
    golden = build_params(_build_args())  # type: ignore[arg-type]
    assert golden == {"name": "debian-bookworm", "force": False}


def test_cli_build_params_from_recipe(tmp_path: Path) -> None:
    from stoker.cli.envs import build_params

    (tmp_path / "stoker.toml").write_text(GOOD)
    p = build_params(_build_args("--recipe", str(tmp_path)))  # type: ignore[arg-type]
    assert p is not None and p["packages"] == ["make", "gcc"] and p["repo"] == str(tmp_path)
    (tmp_path / "stoker.toml").write_text("[image]\npackages = 3\n")
    with pytest.raises(RecipeError, match=r"stoker.toml: image.packages \(line 2\)"):
        build_params(_build_args("--recipe", str(tmp_path)))  # type: ignore[arg-type]


def test_cli_bad_recipe_fails_before_contacting_the_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stoker.cli.main import main

    def refuse(*a: object, **kw: object) -> None:
        raise AssertionError("contacted the daemon")

    monkeypatch.setattr("stoker.cli.image.client", refuse)
    (tmp_path / "stoker.toml").write_text('[vm]\nvcpu = "many"\n')
    rc = main(["image", "build", "--recipe", str(tmp_path)])
    assert rc == 1
    assert "vm.vcpu (line 2): expected an integer" in capsys.readouterr().err


def test_vm_run_recipe_overrides(tmp_path: Path) -> None:
    from stoker.cli.envs import recipe_for_run
    from stoker.cli.main import build_parser

    (tmp_path / "stoker.toml").write_text(GOOD)
    calls: list[tuple[str, dict[str, object]]] = []

    class FakeClient:
        def call(self, method: str, params: dict[str, object], progress: object = None) -> object:
            calls.append((method, params))
            return {"name": "env-abc"}

    args = build_parser("vm", "run").parse_args(["vm", "run", str(tmp_path), "--vcpu", "4"])
    out = recipe_for_run(FakeClient(), args, str(tmp_path))
    assert out == {"memory_mib": 2048, "disk_size": 4 * 1024**3, "nat": True, "image": "env-abc"}
    assert calls[0][0] == "image.build" and calls[0][1]["packages"] == ["make", "gcc"]
    args = build_parser("vm", "run").parse_args(["vm", "run", str(tmp_path), "--image", "x"])
    calls.clear()
    assert "image" not in recipe_for_run(FakeClient(), args, str(tmp_path))
    assert calls == []  # --image overrides: nothing is built
    assert recipe_for_run(FakeClient(), args, None) == {}


def test_vm_net_key_is_the_net_policy(tmp_path: Path) -> None:
    from stoker.cli.envs import recipe_for_run
    from stoker.cli.main import build_parser

    r = parse_recipe('[vm]\nnet = "allow=pypi.org, 10.0.0.0/8"\n', Path("/r/stoker.toml"))
    assert r.vm.net == "allow=pypi.org,10.0.0.0/8"
    assert parse_recipe('[vm]\nnet = "none"\n', Path("/r/stoker.toml")).vm.net == "none"
    (tmp_path / "stoker.toml").write_text('[vm]\nnet = "host-only"\n')
    args = build_parser("vm", "run").parse_args(["vm", "run", str(tmp_path)])
    assert recipe_for_run(None, args, str(tmp_path))["net"] == "host-only"
    args = build_parser("vm", "run").parse_args(["vm", "run", str(tmp_path), "--net", "none"])
    assert "net" not in recipe_for_run(None, args, str(tmp_path))  # the flag wins


def test_copy_key_is_hashed_and_confined_to_the_repo(tmp_path: Path) -> None:
    tool = tmp_path / "tools" / "lint.sh"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    text = '[image]\ncopy = ["tools/lint.sh:/usr/local/bin/lint"]\n'
    r = parse_recipe(text, tmp_path / "stoker.toml")
    ((host, guest, digest, mode),) = r.copies
    assert (host, guest, mode) == (str(tool), "/usr/local/bin/lint", 0o755) and len(digest) == 64
    assert r.has_image
    assert r.build_params()["copies"] == [
        {"host": str(tool), "guest": "/usr/local/bin/lint", "sha256": digest, "mode": 0o755}
    ]
    (tmp_path / "out").symlink_to("/etc/hostname")
    for bad, words in (
        ("../x:/y", "outside the repo"),
        ("/etc/passwd:/y", "relative to the repo"),
        ("out:/y", "outside the repo"),
        ("missing:/y", "cannot read"),
        ("tools:/y", "not a regular file"),
    ):
        with pytest.raises(RecipeError, match=r"image\.copy \(line 2\)") as ei:
            parse_recipe(f'[image]\ncopy = ["{bad}"]\n', tmp_path / "stoker.toml")
        assert words in ei.value.message


def test_cli_build_params_with_copy(tmp_path: Path) -> None:
    from stoker.cli.envs import build_params

    f = tmp_path / "conf.ini"
    f.write_text("a=1\n")
    p = build_params(_build_args("--copy", f"{f}:/etc/app/conf.ini"))  # type: ignore[arg-type]
    assert p is not None and p["from_image"] == "debian-bookworm"
    ((c),) = p["copies"]
    assert (c["host"], c["guest"], c["mode"]) == (str(f), "/etc/app/conf.ini", 0o644)
    with pytest.raises(InvalidArgument, match="under /sys"):
        build_params(_build_args("--copy", f"{f}:/sys/x"))  # type: ignore[arg-type]
