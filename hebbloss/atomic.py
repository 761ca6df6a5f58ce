"""Atomic file writes: a crash, a full disk or an exception leaves either the old file or the new one,
never half of one.

The data go to a temporary file in the target's folder, are flushed and fsynced, and the temporary
file is renamed over the target with :func:`os.replace` (atomic on POSIX and Windows); the folder is
then fsynced where the platform allows it, so the rename itself survives a power cut. On any error the
temporary file is deleted and the target is left as it was. The new file gets the permissions a
plain ``open(path, "w")`` would give it.

    with atomic_file("model.pt") as f:
        torch.save(state, f)
    write_json("results.json", {"accuracy": 0.9})
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

PathLike = Union[str, os.PathLike]


def _plain_open_mode() -> int:
    """0o666 less the process umask: the mode ``open(path, "w")`` creates files with (mkstemp's is 0600)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable; silently skipped where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """Open a binary temporary file next to ``path``; when the block ends without an exception it is
    flushed, fsynced and renamed to ``path``. On any exception it is deleted and ``path`` is left
    exactly as it was. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _plain_open_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns the path."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Write ``obj`` as JSON (``indent=2`` unless told otherwise, a final newline) atomically; returns the path.

    ``obj`` is serialised before the file is touched, so an unserialisable value changes nothing."""
    return write_text(path, json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")
