"""A `data.source` opened as Parquet, whatever it names: a builtin (written once), Parquet
files (one, a folder, a glob, split files), or image / JSONL / text files converted once
to Parquet under `<storage>/.datasets/` (partitioner/converted.py). The partition stage
then reads every source through the same streamed Parquet path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from partitioner import converted
from partitioner.builtins import builtin_name, builtin_split
from partitioner.parquet_rows import ParquetSource, open_parquet
from partitioner.source_files import IMAGE_FILE, PARQUET, FileKinds, SourceListing, list_source


def described_listing(source: str, split: str | None, kinds: FileKinds,
                      builtins: Mapping[str, object], builtin_kind: str,
                      splits: Mapping[str, tuple[str, ...]],
                      installed: Mapping[str, Callable[[str | None], object]]
                      ) -> SourceListing | str:
    """What `islands validate` describes: the listing of `source`, or for a builtin the
    line it prints (the name and split checked, and `installed[name](split)` for one a
    system package provides: nothing read or written)."""
    if source.startswith("builtin:"):
        name = builtin_name(source, builtins, builtin_kind)
        chosen = builtin_split(source, split, splits)
        if name in installed:
            installed[name](chosen)
        split_part = f", split {chosen}" if chosen else ""
        return f"{source}{split_part} (written to storage as Parquet on the first run)"
    return list_source(source, split, kinds)


@dataclass(frozen=True)
class OpenedSource:
    parquet: ParquetSource
    column: str  # the image or text column
    label_column: str | None
    listing: SourceListing | None  # None for a builtin

    @property
    def origin(self) -> str:
        """What the rows came from, for stats.json."""
        if self.listing is None or self.listing.kind == PARQUET:
            return "parquet"
        return {"image": "image files", "jsonl": "JSONL", "txt": "text files"}[
            self.listing.kind]


def open_source(source: str, storage_url: str, kinds: FileKinds, split: str | None,
                column: str, label_column: str | None,
                builtin: Callable[[str, str, str | None], str],
                text_unit: str = "line") -> OpenedSource:
    """The rows of `source` as Parquet (footers read, no rows); `builtin(source, storage,
    split)` checks the split, writes a builtin set the first time and returns its URL."""
    if source.startswith("builtin:"):
        url = builtin(source, storage_url, split)
        return OpenedSource(open_parquet(url, unit_rows=1), column, label_column, None)
    listing = list_source(source, split, kinds)
    if listing.kind == PARQUET:
        parquet = open_parquet(source, unit_rows=1,  # a unit per row group: reads stop early
                               files=tuple(listing.url(file) for file in listing.files))
        return OpenedSource(parquet, column, label_column, listing)
    url = converted.converted_url(listing, storage_url, column, text_unit)
    parquet = replace(open_parquet(url, unit_rows=1), url=source)
    if listing.kind == IMAGE_FILE:
        label = converted.LABEL_COLUMN if label_column and listing.labelled else None
        return OpenedSource(parquet, converted.IMAGE_COLUMN, label, listing)
    return OpenedSource(parquet, converted.TEXT_COLUMN, None, listing)
