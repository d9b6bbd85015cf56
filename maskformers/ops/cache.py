"""The on-disk cache of compiled kernels: atomic publication, and verification before anything is loaded.

A finished build is published in its cache folder as two files: the library ``NAME.so`` and
``manifest.json`` recording the library's size and SHA-256 (and how it was built). Each is written under
a temporary name and renamed into place, the manifest last, so a reader sees either no build or a complete
one. Renaming also gives a rebuilt library a new inode: a process that still has the old one mapped keeps a
valid mapping (a library truncated in place under a running process is what shows up as "Bus error").

Before a library is handed to the dynamic loader, :func:`check` compares it with its manifest; a
truncated, empty or altered file is reported as damaged (naming the file and what differs) instead of
crashing the process in ``dlopen``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["MANIFEST", "CacheState", "check", "discard", "file_sha256", "publish"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CacheState:
    """Outcome of :func:`check`: ``state`` is "ok", "missing" (nothing published yet) or "damaged";
    ``detail`` says what was found."""

    __slots__ = ("state", "detail")

    def __init__(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail

    def __repr__(self) -> str:
        return f"CacheState({self.state!r}, {self.detail!r})"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, flush it to disk, rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755 if path.suffix == ".so" else 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def publish(built: Path, library: Path, description: dict[str, str]) -> dict[str, object]:
    """Copy the freshly linked ``built`` library to ``library`` and write its manifest, both atomically.
    Returns the manifest."""

    def copy(dst) -> None:
        with open(built, "rb") as src:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)

    _atomic_write(library, copy)
    manifest = {
        "library": library.name,
        "size": library.stat().st_size,
        "sha256": file_sha256(library),
        "build": dict(description),
    }
    _atomic_write(library.parent / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    return manifest


def check(library: Path) -> CacheState:
    """Compare ``library`` with the manifest next to it (size first, then SHA-256)."""
    manifest_path = library.parent / MANIFEST
    if not manifest_path.is_file():
        return CacheState("missing", f"no finished build in {library.parent}")
    try:
        manifest = json.loads(manifest_path.read_text())
        size, digest = int(manifest["size"]), str(manifest["sha256"])
        if manifest.get("library") != library.name:
            return CacheState("damaged", f"{manifest_path} describes {manifest.get('library')!r}, not {library.name}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return CacheState("damaged", f"its manifest {manifest_path} is unreadable ({type(exc).__name__}: {exc})")
    try:
        actual_size = library.stat().st_size
    except OSError:
        return CacheState("damaged", f"{library} is missing although {manifest_path} records it")
    if actual_size != size:
        return CacheState("damaged", f"{library} has {actual_size} bytes, the build wrote {size}")
    try:
        actual = file_sha256(library)
    except OSError as exc:
        return CacheState("damaged", f"{library} cannot be read ({exc})")
    if actual != digest:
        return CacheState("damaged", f"{library} has SHA-256 {actual[:16]}..., the build wrote {digest[:16]}...")
    return CacheState("ok", f"cached at {library}")


def discard(library: Path, *also: Path) -> None:
    """Remove a published build (manifest first, so no reader trusts a half-removed one) and ``also``."""
    for path in (library.parent / MANIFEST, library, *also):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
