"""A local filesystem that records what is read through it, to prove what a start or a
log reader does not read. Registered as protocol `counted://` by the tests that use it."""

from __future__ import annotations

from typing import Any, ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem


class CountingFileSystem(LocalFileSystem):
    protocol = ("counted",)
    root_marker = "/"
    opened: ClassVar[list[str]] = []  # paths opened for reading, in order
    read: ClassVar[list[tuple[str, int]]] = []  # (path, bytes) of every cat_file (range reads)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("counted://"):
            path = path[len("counted://"):]
        return super()._strip_protocol(path)

    @classmethod
    def reset(cls) -> None:
        cls.opened.clear()
        cls.read.clear()

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            CountingFileSystem.opened.append(path)
        return super()._open(path, mode, *args, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        data = super().cat_file(path, start=start, end=end, **kwargs)
        CountingFileSystem.read.append((self._strip_protocol(path), len(data)))
        return data


def register() -> None:
    fsspec.register_implementation("counted", CountingFileSystem, clobber=True)
