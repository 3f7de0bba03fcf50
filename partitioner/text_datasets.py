"""Text datasets as Parquet over fsspec, plus builtin real corpora installed by packages.

`builtin:fortunes` reads the Debian fortune files (packages fortunes, fortunes-de,
fortunes-es, fortunes-it) when they are installed and falls back to the pip package
chatterbot-corpus otherwise; `builtin:chatterbot` asks for the latter directly;
`builtin:fortunes-multilingual` reads every installed fortunes language package
(partitioner/fortunes_multilingual.py). Each is written once as Parquet (text, language,
topic) and read back like a user's bucket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from partitioner.builtins import builtin_name, refuse_split, written_once
from partitioner.fortunes_multilingual import (
    FORTUNE_ROOT,
    OTHER_ROOT_FILES,
    check_installed,
    read_multilingual_fortunes,
)
from partitioner.parquet_rows import ParquetSource, open_parquet
from partitioner.request import PartitionRequest
from partitioner.row_source import ParquetRows, RowBatch
from partitioner.source_files import JSONL, TEXT_SOURCES, TXT
from partitioner.sources import OpenedSource, described_listing, open_source
from runstore.errors import InputError
from runstore.shards import text_shard_table

# Offensive fortunes are left out; fortunes-it links its files into the English folder;
# fortunes-br and fortunes-zh put theirs there (OTHER_ROOT_FILES), not English.
FORTUNE_SKIP = {"es/off", "off"} | OTHER_ROOT_FILES


def _fortune_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for language, folder in (("en", root), ("de", root / "de"), ("es", root / "es"),
                             ("it", root / "it")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            relative = path.relative_to(root).as_posix()
            if (path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8")
                    or relative in FORTUNE_SKIP or relative.startswith("es/off/")):
                continue
            files.append((language, path))
    return files


def read_fortunes(root: Path = FORTUNE_ROOT) -> list[dict[str, str]]:
    rows = []
    for language, path in _fortune_files(root):
        topic = path.name.removesuffix(".fortunes")
        text = path.read_bytes().decode("utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            entry = entry.strip().strip("%").strip()
            if len(entry) >= 20:
                rows.append({"text": entry, "language": language, "topic": topic})
    return rows


def read_chatterbot() -> list[dict[str, str]]:
    try:
        import chatterbot_corpus
    except ImportError:
        raise InputError("data.source", "builtin:chatterbot needs the pip package "
                         "chatterbot-corpus (pip install chatterbot-corpus)") from None
    import yaml

    rows = []
    data = Path(chatterbot_corpus.__file__).parent / "data"
    for path in sorted(data.glob("*/*.yml")):
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in content.get("conversations") or []:
            text = "\n".join(str(turn) for turn in conversation if turn is not None)
            if text.strip():
                rows.append({"text": text, "language": path.parent.name, "topic": path.stem})
    return rows


def fortunes_installed(root: Path = FORTUNE_ROOT) -> bool:
    return bool(_fortune_files(root)) if root.is_dir() else False


TEXT_BUILTINS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "fortunes": read_fortunes,
    "chatterbot": read_chatterbot,
    "fortunes-multilingual": read_multilingual_fortunes,
}


def resolve_text_source(source: str, storage_url: str) -> tuple[str, str]:
    """Return (Parquet URL, corpus name actually used), writing a builtin the first time."""
    if not source.startswith("builtin:"):
        return source, source
    name = builtin_name(source, TEXT_BUILTINS, "text ")
    if name == "fortunes" and not fortunes_installed():
        name = "chatterbot"  # the Debian packages are absent: use the pip corpus
    url = written_once(storage_url, name, lambda: pa.Table.from_pylist(TEXT_BUILTINS[name]()))
    return url, f"builtin:{name}"


EXTRA_COLUMNS = ("language", "topic")  # kept in shards and summarised per cluster


class TextSummary:
    """The corpus, mean text length, empty texts dropped, and each cluster's most common
    extra values."""

    def __init__(self, corpus: str, extra: list[str], clusters: int, dropped: set[int],
                 origin: str) -> None:
        self.corpus = corpus
        self.counters = {name: [Counter() for _ in range(clusters)] for name in extra}
        self.rows = 0
        self.bytes = 0
        self.dropped = dropped
        self.origin = origin

    def add(self, batch: RowBatch, clusters: np.ndarray) -> None:
        self.rows += len(batch)
        self.bytes += sum(len(text.encode()) for text in batch.items)
        for name, counters in self.counters.items():
            for value, cluster in zip(batch.columns[name], clusters.tolist(), strict=True):
                if cluster >= 0:
                    counters[cluster][value] += 1

    def merge(self, other: TextSummary) -> None:
        """Counter.update keeps first-seen order, so ties of most_common stay as in one
        pass over the whole dataset."""
        self.rows += other.rows
        self.bytes += other.bytes
        if other.dropped is not self.dropped:  # a Ray task's copy of the set
            self.dropped |= other.dropped
        for name, counters in self.counters.items():
            for mine, theirs in zip(counters, other.counters[name], strict=True):
                mine.update(theirs)

    def result(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "mean_bytes": self.bytes / max(self.rows, 1),
                "dropped_rows": len(self.dropped), "data_origin": self.origin,
                **{f"{name}_top": [counter.most_common(5) for counter in counters]
                   for name, counters in self.counters.items()}}


def open_text_source(request: PartitionRequest) -> tuple[OpenedSource, str]:
    """The request's texts as Parquet, their column checked (footers); and the corpus."""
    corpus = [request.source]

    def builtin(source: str, storage_url: str, split: str | None) -> str:
        refuse_split(source, split)  # no text builtin has splits
        url, corpus[0] = resolve_text_source(source, storage_url)
        return url

    opened = open_source(request.source, request.storage, TEXT_SOURCES, request.split,
                         request.text_column, None, builtin, request.text_unit)
    check_text_column(opened.parquet, opened.column)
    return opened, corpus[0]


def describe_text_source(source: str, split: str | None, column: str, text_unit: str) -> str:
    """What `islands validate` says about the texts, from Parquet footers or a listing:
    the rows are not read, and nothing is converted or written."""
    listing = described_listing(source, split, TEXT_SOURCES, TEXT_BUILTINS, "text ", {},
                                {"fortunes-multilingual": lambda _split: check_installed()})
    if isinstance(listing, str):
        return listing
    split_part = f", split {listing.split}" if listing.split else ""
    files = len(listing.files)
    if listing.kind == JSONL:
        return (f"{files:,} JSONL file(s), text field {column!r} (converted to Parquet on "
                f"the first run){split_part}")
    if listing.kind == TXT:
        unit = "a document per line" if text_unit == "line" else "a document per file"
        return (f"{files:,} text file(s), {unit} (converted to Parquet on the first run)"
                f"{split_part}")
    parquet = open_parquet(source, files=tuple(listing.url(f) for f in listing.files))
    check_text_column(parquet, column)
    return f"{parquet.rows:,} rows, text column {column!r}{split_part}"


def check_text_column(parquet: ParquetSource, column: str) -> None:
    for file, schema in zip(parquet.urls, parquet.schemas, strict=True):
        if column not in schema.names:
            raise InputError("data.text_column", f"column {column!r} not in {file} "
                             f"(columns: {', '.join(schema.names)})")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{file} column {column!r}", f"expected strings, got type {kind}")


def read_text_rows(request: PartitionRequest) -> ParquetRows:
    """The corpus as partition rows, read lazily; shards keep the text and its extra columns.
    Empty texts are dropped (counted in stats.json as `dropped_rows`)."""
    opened, corpus = open_text_source(request)
    parquet, column = opened.parquet, opened.column
    extra = [name for name in EXTRA_COLUMNS if name != column
             and all(name in schema.names for schema in parquet.schemas)]
    dropped: set[int] = set()  # row numbers of empty texts, from every read

    def decode(table: pa.Table, ids: np.ndarray) -> RowBatch:
        texts = table.column(column).to_pylist()
        empty = [text is None or not text.strip() for text in texts]
        columns = {name: table.column(name).to_pylist() for name in extra}
        batch = RowBatch(ids, texts, columns)
        if any(empty):
            dropped.update(ids[np.flatnonzero(empty)].tolist())
            batch = batch.take(np.flatnonzero(~np.asarray(empty)))
        return batch

    return ParquetRows(parquet, [column, *extra], decode,
                       lambda batch: text_shard_table(batch.items, batch.ids, batch.columns),
                       lambda clusters: TextSummary(corpus, extra, clusters, dropped,
                                                    opened.origin), request.max_rows)
