"""What a run records of each artifact, so that a start checks them by metadata alone.

A record is `{"sha256", "size", "stamp"}`: the stamp is what the store changes on every
write of the object (local disks: inode, mtime_ns and ctime_ns; S3 and Azure: the ETag;
GCS: the generation; memory://: the creation time). A start compares size and stamp from
a stat per file on local disks, and on remote stores one recursive listing of a folder
holding many artifacts (experts/) or parallel metadata calls, and hashes a file in full only
when its stamp differs, as after a copy of the run directory, or when its store gives
none. Whoever reads an artifact's bytes still checks its sha256 (`Manifest.read_verified`,
a checkpoint's meta.json), so a change that keeps size and stamp is caught at its read.

Manifests written before records existed list a plain sha256 per file: those are hashed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from runstore import storage

Record = dict[str, Any]
PARALLEL = 32  # metadata calls in flight on a remote store; each is one small request
LIST_OVER = 16  # artifacts in one top folder from which a listing is cheaper than a call each


def sha256_of(entry: str | Mapping[str, Any]) -> str:
    """The sha256 an artifact entry expects: a record's, or a plain (older) sha256."""
    return entry if isinstance(entry, str) else str(entry["sha256"])


def stat(url: str) -> tuple[int, str | None] | None:
    """(size, stamp) of the file at `url`, or None when there is none. One metadata call."""
    fs, path = storage.filesystem(url)
    if isinstance(fs, LocalFileSystem):
        try:
            found = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return found.st_size, f"{found.st_ino}:{found.st_mtime_ns}:{found.st_ctime_ns}"
    try:
        info = _info(fs, path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    return int(info["size"]), _stamp(info)


def _stamp(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "generation"):
        if info.get(key):
            return str(info[key])
    created = info.get("created")  # memory://: a new object on every write
    return str(created.timestamp() if hasattr(created, "timestamp") else created) \
        if created is not None else None


@storage.retried
def _info(fs: Any, path: str) -> dict[str, Any]:
    return fs.info(path)


def _stat_all(root: str, paths: list[str]) -> list[tuple[int, str | None] | None]:
    """stat() of each path in the run: os.stat on local disks; on a remote store one
    recursive listing per top folder holding many of them (partition/, experts/: a page
    per 1,000 objects), else one metadata call per file, in parallel."""
    urls = [storage.join(root, path) for path in paths]
    if not urls or isinstance(storage.filesystem(root)[0], LocalFileSystem):
        return [stat(url) for url in urls]  # a local stat takes microseconds
    folders: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        folders.setdefault(path.split("/", 1)[0] if "/" in path else "", []).append(i)
    found: list[tuple[int, str | None] | None] = [None] * len(urls)
    single = []
    for folder, members in folders.items():
        if folder and len(members) >= LIST_OVER:
            listed = _listing(storage.join(root, folder))
            for i in members:
                info = listed.get(storage.filesystem(urls[i])[1])
                found[i] = None if info is None else (int(info["size"]), _stamp(info))
        else:
            single.extend(members)
    with ThreadPoolExecutor(max(1, min(PARALLEL, len(single)))) as pool:
        for i, meta in zip(single, pool.map(stat, [urls[i] for i in single]), strict=True):
            found[i] = meta
    return found


@storage.retried
def _listing(url: str) -> dict[str, dict[str, Any]]:
    """{path: info} of every file under `url`, from one paginated listing."""
    fs, path = storage.filesystem(url)
    return {str(name): info for name, info in fs.find(path, detail=True).items()
            if info.get("type") != "directory"}


def record(root: str, artifacts: Mapping[str, str | Mapping[str, Any]]) -> dict[str, Record]:
    """Records for artifacts just written, given as {path in the run: sha256 or record}:
    the size and stamp are read from the store now. A file that is already gone keeps its
    sha256 alone, so a start hashes (and refuses) it."""
    fresh = [path for path, entry in artifacts.items() if isinstance(entry, str)]
    found = _stat_all(root, fresh)
    records = {path: dict(entry) for path, entry in artifacts.items()
               if not isinstance(entry, str)}
    for path, meta in zip(fresh, found, strict=True):
        sha = str(artifacts[path])
        records[path] = {"sha256": sha} if meta is None else \
            {"sha256": sha, "size": meta[0], "stamp": meta[1]}
    return {path: records[path] for path in artifacts}


def unchanged(root: str, artifacts: dict[str, Any]) -> bool:
    """True when every artifact is still the file recorded (see `changed`)."""
    return not changed(root, [artifacts])


def changed(root: str, groups: list[dict[str, Any]]) -> set[int]:
    """Which groups of artifacts (an expert's, say) hold one that is no longer the file
    recorded: gone, another size, or, where the stamp differs or was never recorded, another
    sha256 read in full. All groups' files are looked up together (one listing of experts/
    on S3 for every expert). An entry confirmed by its hash is recorded anew in its group
    (its new stamp, a record for a plain sha256), so that a copied run, once saved, starts
    without hashing."""
    members = [(g, path) for g, group in enumerate(groups) for path in group]
    found = _stat_all(root, [path for _, path in members])
    bad: set[int] = set()
    for (g, path), meta in zip(members, found, strict=True):
        entry = groups[g][path]
        if g in bad:
            continue
        if meta is None:
            bad.add(g)
            continue
        if isinstance(entry, Mapping) and "size" in entry:
            if meta[0] != entry["size"]:
                bad.add(g)
                continue
            if meta[1] is not None and meta[1] == entry.get("stamp"):
                continue
        try:
            same = storage.sha256_file(storage.join(root, path)) == sha256_of(entry)
        except FileNotFoundError:
            same = False
        if same:
            groups[g][path] = {"sha256": sha256_of(entry), "size": meta[0], "stamp": meta[1]}
        else:
            bad.add(g)
    return bad
