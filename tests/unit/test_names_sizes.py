"""VM names (RFC 1123 labels, no normalisation) and human sizes."""

from __future__ import annotations

import pytest

from stoker.errors import InvalidArgument
from stoker.model.names import generate_name, validate_artifact_name, validate_name
from stoker.model.sizes import (
    MAX_DISK_BYTES,
    MIN_DISK_BYTES,
    check_memory_mib,
    format_size,
    parse_size,
)

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
    ("text", "want"),
    [
        ("8G", 8 * GiB),
        ("8g", 8 * GiB),
        ("8GiB", 8 * GiB),
        ("512M", 512 * MiB),
        ("512 MB", 512 * MiB),
        ("1.5G", int(1.5 * GiB)),
        ("4096B", 4096),
        (4096, 4096),  # an integer is bytes
        ("1K", 1024),
        ("1T", 1024**4),
        (" 2G ", 2 * GiB),
        ("16383G", MAX_DISK_BYTES),
    ],
)
def test_parse_size(text: str | int, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "text", ["0", "0G", 0, -1, "-1G", "", "big", "8Q", "G", "1.2.3G", "0.0001K", True, 1.5, None]
)
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text, "disk size")  # type: ignore[arg-type]
    assert "disk size" in ei.value.message


# Issue 9 item 7. Old behaviour, per case: OverflowError (int(float("9"*400)) is inf);
# accepted and failing later at truncate/mkfs (99999999T, 20T, 2**63 bytes); "1" taken as
# 1 MiB or 1 GiB depending on where it was written; "٣G" (ARABIC-INDIC DIGIT THREE) as 3G.
@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param("9" * 400 + "T", "is not a size", id="400 nines T"),
        pytest.param("9" * 5000, "is not a size", id="5000 nines"),
        ("99999999T", "at most 16383G"),
        ("20T", "at most 16383G"),
        ("16384G", "at most 16383G"),
        (2**63, "at most 16383G"),
        pytest.param(10**5000, "at most 16383G", id="10**5000"),
        ("1", "has no unit"),
        ("4096", "has no unit"),
        ("\u0663G", "is not a size"),
        ("\uff18G", "is not a size"),  # FULLWIDTH DIGIT EIGHT
    ],
)
def test_parse_size_hostile_values(text: str | int, why: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text, "vm_defaults.disk_size")
    assert why in ei.value.message
    assert "vm_defaults.disk_size" in ei.value.message
    assert len(ei.value.message) < 300  # a hostile value is not echoed whole


def test_parse_size_floor() -> None:
    with pytest.raises(InvalidArgument, match="at least 256M"):
        parse_size("255M", "--disk-size", min_bytes=MIN_DISK_BYTES)
    assert parse_size("256M", min_bytes=MIN_DISK_BYTES) == MIN_DISK_BYTES


def test_memory_bounds_follow_the_host() -> None:
    """Old behaviour: memory_mib 2**63 was accepted and failed at VMM start."""
    host = 16 * GiB
    assert check_memory_mib(2048, "--memory", host) == 2048
    assert check_memory_mib(16 * 1024, "--memory", host) == 16 * 1024
    for bad, why in (
        (2**63, "at most 16384 MiB"),
        (16 * 1024 + 1, "at most 16384 MiB"),
        (127, "at least 128"),
        (-5, "at least 128"),
        ("2G", "whole number"),
        (True, "whole number"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            check_memory_mib(bad, "--memory", host)
    # Unknown host memory still has a ceiling.
    with pytest.raises(InvalidArgument, match="at most"):
        check_memory_mib(2**63, "--memory", 0)


@pytest.mark.parametrize(
    ("n", "want"),
    [(8 * GiB, "8G"), (512 * MiB, "512M"), (int(1.5 * GiB), "1.5G"), (100, "100B"), (1024, "1K")],
)
def test_format_size(n: int, want: str) -> None:
    assert format_size(n) == want


def test_format_parse_round_trip() -> None:
    for n in (1024, 3 * MiB, 8 * GiB, 2 * 1024**4):
        assert parse_size(format_size(n)) == n
