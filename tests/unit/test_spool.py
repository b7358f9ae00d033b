"""The spool: names from hashes, paths that stay inside, no temporary file left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway import spool as spool_module
from gateway.spool import TEMP_PREFIX, Spool, SpoolError, SpoolFull, key_digest

REPO = Path(__file__).resolve().parents[2]
HOSTILE_KEYS = [
    "../x",
    "..",
    "/etc/x",
    "../../../../etc/passwd",
    "a/../../b",
    "\\..\\..\\windows",
    "1.2.3\x00../evil",
    "é" * 64,
    "x" * 300,
    "",
]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def all_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_store_is_named_by_hash_and_keeps_the_bytes(spool: Spool) -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    data = b"DICM" + os.urandom(1000)
    stored = spool.store(data, key=uid)

    assert uid not in stored.path
    assert "12345" not in stored.path
    digest = hashlib.sha256(uid.encode()).hexdigest()
    assert stored.path.startswith(f"instances/{digest[:2]}/{digest[2:4]}/{digest}-")
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data)
    assert spool.path(stored.path).read_bytes() == data
    assert spool.read_bytes(stored.path) == data


def test_each_copy_of_one_key_gets_its_own_file(spool: Spool) -> None:
    first = spool.store(b"first", key="1.2.3")
    second = spool.store(b"first", key="1.2.3")
    assert first.path != second.path
    assert spool.remove(second.path)
    assert spool.read_bytes(first.path) == b"first"


def test_memoryview_input(spool: Spool) -> None:
    data = bytearray(b"abc" * 1000)
    stored = spool.store(memoryview(data), key="k")
    assert spool.read_bytes(stored.path) == bytes(data)


def test_parts_are_written_in_order_as_one_file(spool: Spool) -> None:
    parts = [b"preamble", memoryview(bytearray(b"-data set-")), b"", memoryview(b"end")]
    stored = spool.store(parts, key="1.2.3")
    expected = b"preamble-data set-end"
    assert spool.read_bytes(stored.path) == expected
    assert stored.sha256 == hashlib.sha256(expected).hexdigest()
    assert stored.size == len(expected)


def test_size_counts_bytes_not_items(spool: Spool) -> None:
    words = memoryview(bytearray(8)).cast("H")  # 4 items of 2 bytes
    assert spool.store(words, key="k").size == 8


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=lambda key: repr(key)[:20])
def test_hostile_keys_stay_inside_the_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    stored = spool.store(b"data", key=key)
    derived = spool.store_derived(b"png", key=key, kind="png", suffix=".png")

    for relative in (stored.path, derived.path):
        absolute = spool.path(relative)
        assert absolute.is_relative_to(root.resolve())
        if key.strip("/.\\\x00"):
            assert key not in relative
    # Nothing was written anywhere else under tmp_path.
    assert {p.relative_to(tmp_path).parts[0] for p in all_files(tmp_path)} == {"spool"}


@pytest.mark.parametrize(
    "relative",
    ["../x", "..", "/etc/passwd", "instances/../../x", "", "a\\..\\..\\b", "."],
    ids=repr,
)
def test_path_refuses_anything_outside_the_root(spool: Spool, relative: str) -> None:
    with pytest.raises(SpoolError):
        spool.path(relative)


def test_path_refuses_a_symlink_out_of_the_root(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    (spool.root / "link").symlink_to(outside)
    with pytest.raises(SpoolError, match="outside"):
        spool.path("link/secret")


def test_derived_names_are_stable_per_key_and_replaced(spool: Spool) -> None:
    first = spool.store_derived(b"one", key="1.2.3.4", kind="gradcam")
    second = spool.store_derived(b"two", key="1.2.3.4", kind="gradcam")
    assert first.path == second.path
    assert first.path.startswith("derived/gradcam/")
    assert first.path.endswith(".dcm")
    assert "1.2.3.4" not in first.path
    assert spool.read_bytes(first.path) == b"two"
    other = spool.store_derived(b"sr", key="1.2.3.4", kind="sr")
    assert other.path != first.path


@pytest.mark.parametrize("kind", ["../x", "", "A", "a/b", "x" * 40])
def test_derived_kind_is_validated(spool: Spool, kind: str) -> None:
    with pytest.raises(ValueError, match="derived kind"):
        spool.store_derived(b"x", key="k", kind=kind)


@pytest.mark.parametrize("suffix", ["png", "./png", ".PNG/..", ".toolongsuffix"])
def test_derived_suffix_is_validated(spool: Spool, suffix: str) -> None:
    with pytest.raises(ValueError, match="suffix"):
        spool.store_derived(b"x", key="k", kind="png", suffix=suffix)


def test_remove(spool: Spool) -> None:
    stored = spool.store(b"x", key="k")
    assert spool.remove(stored.path)
    assert not spool.remove(stored.path)
    assert not spool.path(stored.path).exists()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errno.ENOSPC, SpoolFull),
        (errno.EDQUOT, SpoolFull),
        (errno.EFBIG, SpoolFull),
        (errno.EIO, SpoolError),
    ],
)
@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_failed_write_leaves_no_temporary_file(
    spool: Spool,
    monkeypatch: pytest.MonkeyPatch,
    error: int,
    expected: type[SpoolError],
    failing: str,
) -> None:
    def fail(*args: object) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(spool_module.os, failing, fail)
    with pytest.raises(expected) as raised:
        spool.store(b"x" * 10000, key="1.2.3")
    monkeypatch.undo()
    if expected is SpoolError:
        assert not isinstance(raised.value, SpoolFull)
    assert all_files(spool.root) == []


def test_partial_write_then_no_space_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = []

    def write_half_then_fail(descriptor: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(descriptor, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", write_half_then_fail)
    with pytest.raises(SpoolFull):
        spool.store(b"y" * 10000, key="1.2.3")
    assert len(calls) == 2
    assert all_files(spool.root) == []


def test_file_size_limit_gives_spool_full_and_no_file(tmp_path: Path) -> None:
    # A real EFBIG from the kernel: RLIMIT_FSIZE in a child process (Python ignores
    # SIGXFSZ, so write() fails instead of the process being killed).
    root = tmp_path / "spool"
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from gateway.spool import Spool, SpoolFull
        spool = Spool(Path({str(root)!r}))
        small = spool.store(b"s" * 1000, key="small")
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            spool.store(b"b" * 100_000, key="big")
        except SpoolFull as error:
            print("FULL", small.path)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    status, small_path = result.stdout.split()
    assert status == "FULL"
    assert [p.relative_to(root).as_posix() for p in all_files(root)] == [small_path]


def test_sweep_temp_removes_leftovers_only(spool: Spool) -> None:
    kept = spool.store(b"keep", key="k")
    folder = spool.path(kept.path).parent
    leftover = folder / f"{TEMP_PREFIX}abc123"
    leftover.write_bytes(b"partial")
    nested = spool.root / "derived" / "png" / "aa" / "bb"
    nested.mkdir(parents=True)
    (nested / f"{TEMP_PREFIX}x").write_bytes(b"partial")

    assert spool.sweep_temp() == 2
    assert [p.relative_to(spool.root).as_posix() for p in all_files(spool.root)] == [kept.path]
    assert spool.sweep_temp() == 0


def test_sweep_temp_spares_recent_files_when_asked(spool: Spool) -> None:
    recent = spool.root / f"{TEMP_PREFIX}recent"
    recent.write_bytes(b"in progress")
    old = spool.root / f"{TEMP_PREFIX}old"
    old.write_bytes(b"stale")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    assert spool.sweep_temp(older_than_s=600) == 1
    assert recent.exists()
    assert not old.exists()


def test_free_space_watermark(spool: Spool) -> None:
    free = spool.free_bytes()
    assert free > 0
    free_mb = free // (1024 * 1024)
    assert spool.has_room(0)
    assert spool.has_room(max(free_mb - 1, 0))
    assert not spool.has_room(free_mb + 10)
    # The incoming file counts: what is left after it must stay above the mark.
    assert not spool.has_room(0, incoming_bytes=free + 1)


def test_unwritable_root_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SpoolError, match="cannot be created"):
        Spool(blocker / "spool")


def test_key_digest_is_sha256_of_utf8() -> None:
    assert key_digest("abc") == hashlib.sha256(b"abc").hexdigest()
    # A lone surrogate (undecodable text from a peer) still gets a name.
    assert len(key_digest("\udcff")) == 64
