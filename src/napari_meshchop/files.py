"""Files that are either complete or absent: atomic writes, checksums, leftovers.

Everything written under a data folder goes through :func:`atomic_file`: the bytes go to a
hidden ``.NAME.*.part`` file in the same folder, are flushed to disk, and only then renamed
onto ``NAME``. A run killed mid-write leaves at most a ``.part`` file, which no reader takes
for a finished one and :func:`sweep_partials` removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

from napari_meshchop.errors import InputError, MeshchopError

PART_SUFFIX = ".part"
LOCK = ".lock"  # the file :func:`exclusive` locks, in the folder it guards


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing; it appears, complete, only when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    return write_bytes(path, text.encode())


def read_json(folder: str | os.PathLike, name: str, fmt: str, what: str,
              missing: str) -> tuple[Path, dict]:
    """Read ``folder/name`` (or the file ``folder`` itself) as one of our JSON formats.

    Raises InputError naming the file when it is absent (``missing`` says what to do),
    unreadable, or of another format.
    """
    where = Path(folder)
    where = where if where.suffix == ".json" else where / name
    if not where.is_file():
        raise InputError(where, missing)
    try:
        raw = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(where, f"not a readable {what} ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise InputError(where, f"not a napari-meshchop {what}")
    return where, raw


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sweep_partials(folder: str | os.PathLike, older_than: float = 0.0) -> list[Path]:
    """Remove the ``.*.part`` files an interrupted run left under ``folder``; return them.

    ``older_than`` (seconds) spares the files that a writer running now may still own.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for part in folder.rglob(f".*{PART_SUFFIX}"):
        try:
            if part.is_file() and now - part.stat().st_mtime >= older_than:
                part.unlink()
                removed.append(part)
        except FileNotFoundError:  # its writer finished or cleaned up meanwhile
            pass
    return removed


@contextmanager
def exclusive(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``folder/.lock`` while the block runs; raise if another process holds it.

    An operating-system lock (``filelock``: flock on Unix, msvcrt on Windows), so it is
    released when its holder dies, however it dies.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise MeshchopError(f"{folder}: another {what} is writing here; wait for it "
                            "to finish (or stop it) and run again") from None
    try:
        yield
    finally:
        lock.release()
