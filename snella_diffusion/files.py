"""Atomic writes: a file or folder appears under its final name only once completely written.

Every writer of the package goes through here, so a killed run never leaves a truncated
adapter, export, report, image or pipeline folder behind (the old one stays until the new one
is complete). Temporary names start with ``.<final name>.`` in the destination's folder, so
the final rename never crosses file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(destination: PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``destination`` (its folder is created); when the
    block ends normally it is renamed onto ``destination``, when it raises it is deleted.

    The file gets the permissions a plain ``open(..., "w")`` would give (0o666 less the
    umask), not the 0o600 of ``tempfile.mkstemp``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(destination: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the result onto ``destination``."""
    with atomic_path(destination) as temporary:
        write(temporary)
    return Path(destination)


def write_text_atomically(destination: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``destination`` atomically."""
    return write_atomically(destination, lambda path: path.write_text(text, encoding="utf-8"))


def write_json_atomically(destination: PathLike, payload: Any, indent: int = 2) -> Path:
    """Write ``json.dumps(payload, indent=indent)`` to ``destination`` atomically."""
    return write_text_atomically(destination, json.dumps(payload, indent=indent))


def replace_folder_atomically(destination: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(staging_folder)`` on an empty folder beside ``destination``, then swap it in.

    An existing ``destination`` is moved aside first and deleted only after the swap, so at
    every moment either the old or the new complete folder exists. On an error the staging
    folder is deleted and ``destination`` is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
        os.replace(destination, old / destination.name)
    os.replace(staging, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return destination
