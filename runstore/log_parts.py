"""An expert's log as numbered parts: `experts/expert-K/log/part-AAAAA-SSSS.txt`.

Object stores cannot append, and rewriting one growing log.txt at every flush costs the
whole log each time. So each attempt (A) writes its own parts in sequence (S): the open
part is rewritten at a flush until it holds PART_BYTES, then the next one starts. A flush
writes at most PART_BYTES, and a part only ever grows while it is open, so a reader that
remembers how much of each part it has shown reads only the bytes after that (a range
read): `islands logs --follow` polls one listing and the new bytes. Part names sort in
the order they were written. A run written before parts existed has one `log.txt`,
read first.
"""

from __future__ import annotations

import re

from runstore import storage

PART_BYTES = 256 * 1024
PART = re.compile(r"part-(\d{5})-(\d{4})\.txt")


def part_name(attempt: int, seq: int) -> str:
    return f"part-{attempt:05d}-{seq:04d}.txt"


def next_seq(folder: str, attempt: int) -> int:
    """The first part number of `attempt` not yet used: a restarted attempt (the same
    number again) goes on after its own parts instead of overwriting them."""
    used = [int(found[2]) for name in storage.listdir(folder)
            if (found := PART.fullmatch(name)) and int(found[1]) == attempt]
    return max(used, default=0) + 1


@storage.retried
def _sizes(folder: str) -> dict[str, int]:
    """{part name: size} of every part in `folder`, from one listing."""
    fs, path = storage.filesystem(folder)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    sizes = {str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
             for entry in entries if entry.get("type") != "directory"}
    return {name: size for name, size in sorted(sizes.items()) if PART.fullmatch(name)}


@storage.retried
def file_size(url: str) -> int | None:
    """The size of the file at `url`, or None when there is none: one metadata call."""
    fs, path = storage.filesystem(url)
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


@storage.retried
def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: a range read on object stores."""
    fs, path = storage.filesystem(url)
    return fs.cat_file(path, start=start, end=end)


class LogReader:
    """What an expert's log holds that this reader has not returned yet."""

    def __init__(self, folder: str, legacy: str | None = None) -> None:
        """`folder`: the parts; `legacy`: a log.txt of older runs, read before them."""
        self.folder = folder
        self.legacy = legacy
        self.shown: dict[str, int] = {}  # bytes of each file already returned
        self.read_bytes = 0  # bytes read from storage, all calls together

    def new_text(self) -> str:
        sizes: dict[str, int] = {}
        if self.legacy is not None and (size := file_size(self.legacy)) is not None:
            sizes[self.legacy] = size
        sizes.update({storage.join(self.folder, name): size
                      for name, size in _sizes(self.folder).items()})
        chunks = []
        for url, size in sizes.items():
            start = self.shown.get(url, 0)
            if size > start:
                data = read_range(url, start, size)
                self.read_bytes += len(data)
                self.shown[url] = start + len(data)
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")


def read_log(folder: str, legacy: str | None = None) -> str:
    """The whole log: the legacy log.txt, then every part in order."""
    return LogReader(folder, legacy).new_text()


class FileTail:
    """A growing file from `offset` on (a background driver's part of driver.log), read
    by what is new since the last call."""

    def __init__(self, url: str, offset: int = 0) -> None:
        self.url = url
        self.offset = offset
        self.position: int | None = None
        self.read_bytes = 0

    def new_text(self) -> str:
        size = file_size(self.url)
        if size is None:
            return ""
        if self.position is None or size < self.position:  # first read, or replaced
            self.position = self.offset if self.offset <= size else 0
        if size <= self.position:
            return ""
        data = read_range(self.url, self.position, size)
        self.position += len(data)
        self.read_bytes += len(data)
        return data.decode(errors="replace")
