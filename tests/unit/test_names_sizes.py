"""VM names (RFC 1123 labels, no normalisation) and human sizes."""

from __future__ import annotations

import pytest

from stoker.errors import InvalidArgument
from stoker.model.names import generate_name, validate_artifact_name, validate_name
from stoker.model.sizes import format_size, parse_size

pytestmark = pytest.mark.unit

GiB = 1024**3
MiB = 1024**2


@pytest.mark.parametrize("name", ["a", "web", "calm-otter", "a1-b2", "0", "x" * 63, "9lives"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("x" * 64, "64 characters"),
        ("-web", "invalid"),
        ("web-", "invalid"),
        ("we_b", "invalid"),
        ("web.vm", "invalid"),
        ("wéb", "invalid"),
        ("a b", "invalid"),
    ],
)
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        validate_name(name)


def test_uppercase_is_an_error_not_lowercased() -> None:
    with pytest.raises(InvalidArgument) as ei:
        validate_name("Web")
    assert "uppercase" in ei.value.message
    assert "'web'" in ei.value.message  # suggests the lowercase form
    assert ei.value.code == "invalid_argument"


def test_generated_names_are_valid_and_avoid_taken() -> None:
    seen = set()
    for _ in range(200):
        n = generate_name()
        assert validate_name(n) == n
        assert "-" in n
        seen.add(n)
    assert len(seen) > 20  # actually random
    taken = frozenset(seen)
    for _ in range(50):
        assert generate_name(taken) not in taken


def test_generated_name_when_every_pair_is_taken() -> None:
    from stoker.model import names

    every = frozenset(f"{a}-{b}" for a in names._ADJECTIVES for b in names._ANIMALS)
    n = generate_name(every)
    assert n not in every
    assert validate_name(n) == n


@pytest.mark.parametrize("name", ["debian-bookworm", "debian-12.5", "my_image", "a"])
def test_valid_artifact_names(name: str) -> None:
    assert validate_artifact_name(name) == name


@pytest.mark.parametrize("name", ["", "Debian", "-x", "x-", ".x", "a/b", "x" * 129])
def test_invalid_artifact_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_artifact_name(name)


@pytest.mark.parametrize(
    ("text", "bare", "want"),
    [
        ("8G", 1, 8 * GiB),
        ("8g", 1, 8 * GiB),
        ("8GiB", 1, 8 * GiB),
        ("512M", 1, 512 * MiB),
        ("512 MB", 1, 512 * MiB),
        ("1.5G", 1, int(1.5 * GiB)),
        ("4096", 1, 4096),
        ("4096", MiB, 4096 * MiB),
        (2048, MiB, 2048 * MiB),
        ("1K", 1, 1024),
        ("1T", 1, 1024**4),
        (" 2G ", 1, 2 * GiB),
    ],
)
def test_parse_size(text: str | int, bare: int, want: int) -> None:
    assert parse_size(text, bare_unit=bare) == want


@pytest.mark.parametrize(
    "text", ["0", "0G", 0, -1, "-1G", "", "big", "8Q", "G", "1.2.3G", "0.0001K", True, 1.5, None]
)
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text, "disk size")  # type: ignore[arg-type]
    assert "disk size" in ei.value.message


@pytest.mark.parametrize(
    ("n", "want"),
    [(8 * GiB, "8G"), (512 * MiB, "512M"), (int(1.5 * GiB), "1.5G"), (100, "100B"), (1024, "1K")],
)
def test_format_size(n: int, want: str) -> None:
    assert format_size(n) == want


def test_format_parse_round_trip() -> None:
    for n in (1024, 3 * MiB, 8 * GiB, 2 * 1024**4):
        assert parse_size(format_size(n)) == n
