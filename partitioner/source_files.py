"""What a `data.source` names, from a listing alone: one file, a folder searched
recursively, or a glob; which files hold data (Parquet, images, JSONL, text), which split
each belongs to (Hugging Face naming: `train-00000-of-00002.parquet`, `test.jsonl`,
`data/train/...`) and, for images in class subfolders (ImageFolder), each file's label.

Nothing here reads a file's contents: `islands validate` and the partition stage share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from runstore import storage
from runstore.errors import InputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif",
                            ".tiff"})
TEXT_SUFFIXES = {".jsonl": "jsonl", ".txt": "txt"}
SPLIT_NAMES = frozenset({"train", "test", "validation", "valid", "val", "dev", "eval"})
# `train-00000-of-00002.parquet` (any split name), as `datasets` writes shards.
_SHARDED = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)-\d+-of-\d+")
_GLOB = re.compile(r"[*?\[]")
# What a data file is, by its suffix.
PARQUET, IMAGE_FILE, JSONL, TXT = "parquet", "image", "jsonl", "txt"


@dataclass(frozen=True)
class FileKinds:
    """The kinds of file a dataset module reads, and how a refusal names them."""

    accepted: tuple[str, ...]
    wanted: str


IMAGE_SOURCES = FileKinds((PARQUET, IMAGE_FILE), "Parquet or image files (.png, .jpg, .webp, ...)")
TEXT_SOURCES = FileKinds((PARQUET, JSONL, TXT), "Parquet, .jsonl or .txt files")


@dataclass(frozen=True)
class SourceFile:
    path: str  # on the source's filesystem
    kind: str  # parquet, image, jsonl or txt
    size: int
    stamp: str  # what changes when the file does: mtime, ETag, generation
    split: str | None
    label: str | None  # the class subfolder of an image, in the ImageFolder layout


@dataclass(frozen=True)
class SourceListing:
    source: str
    protocol: str  # "s3://" or "" for local paths: prefixed to a path for its URL
    kind: str  # what every chosen file is
    files: tuple[SourceFile, ...]
    split: str | None
    root: str  # the folder the files' relative paths start at

    def url(self, file: SourceFile) -> str:
        return self.protocol + file.path

    @property
    def labelled(self) -> bool:
        return all(file.label is not None for file in self.files)


def file_kind(path: str) -> str | None:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".parquet":
        return PARQUET
    if suffix in IMAGE_SUFFIXES:
        return IMAGE_FILE
    return TEXT_SUFFIXES.get(suffix)


def split_of(relative: PurePosixPath) -> tuple[str | None, int]:
    """The split a file belongs to and the index of the folder that names it (-1: its file
    name does, or none)."""
    for index, part in enumerate(relative.parts[:-1]):
        if part.lower() in SPLIT_NAMES:
            return part.lower(), index
    match = _SHARDED.match(relative.name)
    if match:
        return match.group(1).lower(), -1
    first = re.split(r"[-_.]", relative.name, maxsplit=1)[0].lower()
    return (first, -1) if first in SPLIT_NAMES else (None, -1)


def _stamp(info: dict) -> str:
    for key in ("mtime", "LastModified", "ETag", "generation", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _listing(source: str) -> tuple[str, dict[str, dict]]:
    """(the root relative paths start at, {path: its listing entry}) of every file, from
    one listing (no request per file on an object store); missing credentials or a
    refused access are one line naming the remedy."""
    try:
        return _list(source)
    except InputError:
        raise
    except Exception as err:  # sorted: an access problem is bad input, the rest is raised
        refused = storage.access_error(source, err)
        if refused is not None:
            raise refused from None
        raise


def _list(source: str) -> tuple[str, dict[str, dict]]:
    fs, path = storage.filesystem(source)
    glob = _GLOB.search(path)
    if glob:
        entries = fs.glob(path, detail=True)
        files = {p: info for p, info in entries.items() if info.get("type") != "directory"}
        if not files:
            raise InputError("data.source", f"{source} matches no file")
        return path[:glob.start()].rsplit("/", 1)[0], files
    if not storage.exists(source):
        raise InputError("data.source", f"{source} does not exist")
    if storage.isdir(fs, path):
        return path.rstrip("/"), fs.find(path, detail=True)
    return path.rsplit("/", 1)[0] if "/" in path else "", {path: fs.info(path)}


def list_source(source: str, split: str | None, kinds: FileKinds) -> SourceListing:
    """The data files `source` names, of one kind and one split; anything ambiguous (two
    splits and no `data.split`, Parquet beside loose images) is refused in one line."""
    root, entries = _listing(source)
    found: list[tuple[str, str, PurePosixPath]] = []
    for path in sorted(entries):
        kind = file_kind(path)
        relative = PurePosixPath(path[len(root):].lstrip("/") if root else path)
        # Hidden files and folders (.cache of a Hub snapshot, .git, .datasets) are not data.
        if kind in kinds.accepted and not any(part.startswith(".") for part in relative.parts):
            found.append((path, kind, relative))  # type: ignore[arg-type]
    if not found:
        raise InputError("data.source", f"{source} holds no {kinds.wanted}")
    kinds = sorted({kind for _, kind, _ in found})
    if len(kinds) > 1:
        raise InputError("data.source", f"{source} mixes {' and '.join(kinds)} files; "
                         "expected one kind (point data.source at one of them)")
    splits = {path: split_of(relative) for path, _, relative in found}
    names = sorted({name or "(none)" for name, _ in splits.values()})
    if split is None and len(names) > 1:
        raise InputError("data.split", f"{source} holds the splits {', '.join(names)}; "
                         "choose one with data.split")
    if split is not None and split not in names:
        held = "no split files" if names == ["(none)"] else f"the splits {', '.join(names)}"
        raise InputError("data.split", f"{split!r} is not a split of {source}: it holds "
                         f"{held}")
    chosen = names[0] if split is None else split
    files = []
    for path, kind, relative in found:
        name, at = splits[path]
        if (name or "(none)") != chosen:
            continue
        folders = relative.parts[at + 1:-1]
        info = entries[path]
        files.append(SourceFile(path, kind, int(info.get("size") or 0), _stamp(info), name,
                                folders[0] if folders and kind == IMAGE_FILE else None))
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    return SourceListing(source, protocol, kinds[0], tuple(files),
                         None if chosen == "(none)" else chosen, root)
