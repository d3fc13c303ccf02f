"""Writing files and folders whole or not at all: the one atomic-write discipline every writer uses.

Output goes to a temporary name this process created (``tempfile``, beside the target so the final
rename stays on one file system), never a predictable sibling that might be a user's file, and is
renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], object]) -> None:
    """Write ``data`` (text, bytes, or a function that writes the file it is given) to ``path`` so a
    reader sees the old file or the new one, never half of one (through a symlink: the file it names)."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (str, bytes)):
                f.write(data.encode() if isinstance(data, str) else data)
        if callable(data):
            data(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh, empty folder beside ``target``; when the block succeeds it becomes ``target``
    (an existing one is renamed aside first and deleted last, so a crash leaves the old or the new
    folder), and when it fails it is removed and ``target`` is untouched. A symlinked ``target`` keeps
    its link: the folder it points to is the one replaced."""
    target = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if not (target.exists() or target.is_symlink()):
            os.replace(tmp, target)
            return
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.rmdir(aside)
        os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(aside, target)
            raise
        _remove(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
