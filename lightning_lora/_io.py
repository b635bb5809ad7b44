"""Small file-system helpers shared by the package: atomic directory writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lightning_lora.errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise unless `target` can be written: it does not exist, is an empty directory, or `overwrite`.

    Raises:
        OutputExistsError: (a `FileExistsError`) `target` is a file, or a non-empty directory and `overwrite` is False.

    Example:
        >>> import tempfile
        >>> check_output_dir(tempfile.mkdtemp())   # an empty directory is fine
    """
    target = Path(target).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputExistsError(f"{target} exists and is not a directory; choose another output directory.")
        if any(target.iterdir()) and not overwrite:
            raise OutputExistsError(f"{target} already exists and is not empty; pass overwrite=True (--overwrite on the "
                                  "command line) to replace it, or choose another output directory.")


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yields a temporary directory next to `directory`, and renames it
    into place when the block succeeds (the temporary directory is removed when it fails).

    An existing non-empty `directory` is an error unless `overwrite=True`; then the old one is
    renamed aside, the new one renamed into place, and the old one deleted, so `directory` never
    holds a half-written result.

    Raises:
        FileExistsError: `directory` is a file, or a non-empty directory and `overwrite` is False
            (checked before the block runs and again before the rename).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "adapter"
        >>> with atomic_directory(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt']
    """
    target = Path(directory).expanduser().absolute()
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        yield tmp
        for path in tmp.rglob("*"):  # some writers (safetensors) create 0600 files: use the umask like open()
            if path.is_file() and not path.is_symlink():
                os.chmod(path, 0o666 & ~mask)
        check_output_dir(target, overwrite)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            backup.rmdir()
            os.rename(target, backup)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
