"""Builtin datasets (`data.source: builtin:<name>`): real data shipped inside packages,
written once as Parquet to `<storage>/.datasets/` and then read back through the same path
as a user's bucket, so both run the same code."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from runstore import storage
from runstore.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

# (height, width, channels) of each builtin image set, known before it is read, so that a
# config can be checked against its images without reading them (or importing a reader).
BUILTIN_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (8, 8, 1), "mnist5k": (28, 28, 1), "fashion-mnist": (28, 28, 1)}


def refuse_split(source: str, split: str | None) -> None:
    if split is not None:
        raise InputError("data.split", f"{source} has no splits; expected no data.split")


def builtin_name(source: str, builtins: Mapping[str, object], kind: str) -> str:
    """The builtin `source` names; a name not in `builtins` is bad input."""
    name = source.removeprefix("builtin:")
    if name not in builtins:
        raise InputError("data.source", f"unknown {kind}builtin {name!r}; expected one of "
                         f"{', '.join('builtin:' + n for n in builtins)}")
    return name


def builtin_split(source: str, split: str | None,
                  splits: Mapping[str, tuple[str, ...]]) -> str | None:
    """The split of a builtin to read: `data.split`, else its first (the training set);
    None for a builtin without splits, which refuses any `data.split`."""
    held = splits.get(source.removeprefix("builtin:"))
    if held is None:
        refuse_split(source, split)
        return None
    if split is None:
        return held[0]
    if split not in held:
        raise InputError("data.split", f"{split!r} is not a split of {source}; expected one "
                         f"of {', '.join(held)}")
    return split


def written_once(storage_url: str, name: str, table: Callable[[], pa.Table]) -> str:
    """The builtin's Parquet URL in storage, written from `table()` the first time."""
    url = storage.join(storage_url, ".datasets", f"{name}.parquet")
    if not storage.exists(url):
        storage.write_bytes(url, storage.parquet_bytes(table()))
    return url
