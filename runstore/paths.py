"""Paths read from a run's own files (manifest.json, a checkpoint's meta.json,
submission.json) and from mesh messages: each must name a file inside the run directory.

A run directory may come from someone else (a shared bucket, a copied folder), so a path
it records is checked before anything is read or written there: `..` or an absolute path
would reach files outside the run, and a URL scheme another store.
"""

from __future__ import annotations

import posixpath
from typing import Any

from runstore.errors import InputError


def check_path(path: Any, where: str, inside: str = "") -> str:
    """A relative POSIX path that stays inside `inside` (a folder of the run, "" for the
    run itself): a string, no absolute path, no `..`, no backslash, no URL scheme (no
    `:`), no control characters, already normalized. Returns it; otherwise InputError at
    `where` (the file and field it came from)."""
    text = path if isinstance(path, str) else ""
    clean = posixpath.normpath(text) if text else ""
    if (clean in ("", ".") or clean.startswith(("/", "..")) or clean != text
            or any(c in text for c in "\\:") or any(ord(c) < 32 for c in text)
            or (inside and not clean.startswith(inside.rstrip("/") + "/"))):
        raise InputError(where, f"path {path!r} is not a plain relative path inside "
                         f"{inside or 'the run'}")
    return clean
