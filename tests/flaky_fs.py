"""A local filesystem that fails every Nth operation, to prove runs survive flaky storage.

Registered as protocol `flaky://` in the test process and, through Ray's worker setup
hook, in every Ray worker, so experts see the same failures the driver does.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

FAIL_EVERY = int(os.environ.get("ISLANDS_FLAKY_EVERY", "5"))


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)
    root_marker = "/"
    calls = 0
    failures = 0
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return super()._strip_protocol(path)

    def _maybe_fail(self, operation: str) -> None:
        with FlakyFileSystem._lock:
            FlakyFileSystem.calls += 1
            if FlakyFileSystem.calls % FAIL_EVERY == 0:
                FlakyFileSystem.failures += 1
                raise ConnectionError(f"flaky storage dropped {operation} (injected)")

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail(f"open {mode}")
        return super()._open(path, mode, *args, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        self._maybe_fail("exists")
        return super().exists(path, **kwargs)

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        self._maybe_fail("mv")
        super().mv(path1, path2, *args, **kwargs)

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> Any:
        self._maybe_fail("ls")
        return super().ls(path, detail=detail, **kwargs)


def register() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
