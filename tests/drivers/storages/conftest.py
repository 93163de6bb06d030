"""Fixtures for storage faults on real file systems: a small one (disk full), immutable files."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The size of the small file system a disk-full test fills.
SMALL_FS_BYTES = 8 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A file system of :data:`SMALL_FS_BYTES` of its own (a tmpfs mounted for this test): a
    disk that really fills up. Skips where mounting is not allowed (not root, no tmpfs)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for a disk-full test needs root")
    size = f"size={SMALL_FS_BYTES // 1024}k"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", size, "payler-test", str(where)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(
            ["umount", "--lazy", str(where)], capture_output=True, timeout=30, check=True
        )


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill ``folder``'s file system with one file until about ``leave_bytes`` are free."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    filler = folder / "filler"
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, free - leave_bytes))
    return filler


def chattr(flag: str, *paths: Path) -> None:
    """``chattr`` the files (``+i``: immutable, ``-i``: no longer)."""
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True, timeout=30)


@pytest.fixture
def immutable_files(tmp_path: Path) -> Iterator[list[Path]]:
    """Files a test makes immutable (append them); made mutable again after the test, so that
    they can be deleted. Skips where ``chattr +i`` does not work (not root, file system)."""
    probe = tmp_path / "chattr-probe"
    probe.touch()
    try:
        chattr("+i", probe)
        chattr("-i", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make files immutable here (chattr +i): {exc}")
    made: list[Path] = []
    try:
        yield made
    finally:
        existing = [path for path in made if path.exists()]
        if existing:
            chattr("-i", *existing)
