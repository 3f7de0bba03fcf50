"""Label columns as users hold them, mapped to int64 ids with -1 for "no label".

Integers are ids as they are (a Hugging Face ClassLabel's names come from the schema's
`huggingface` metadata when present); strings and dictionary-encoded strings are mapped to
ids in sorted order of the names found in the rows read; floats are ids when whole. Nulls,
negative ids and other floats count as unlabelled; everything that uses labels downstream
skips -1. A column of another type is ignored, and stats.json says why: labels are
optional, so no label problem stops a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from partitioner.parquet_rows import ParquetSource

UNLABELLED = -1


def label_kind(kind: pa.DataType) -> str | None:
    """How a label column of this type is read: int, string, float; None: not a label."""
    if pa.types.is_dictionary(kind):
        return label_kind(kind.value_type) if not pa.types.is_dictionary(kind.value_type) \
            else None
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return "int"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_floating(kind):
        return "float"
    return None


def class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """A Hugging Face ClassLabel's names, from the metadata `datasets` writes."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
        features = meta.get("info", {}).get("features") or meta.get("features") or {}
        feature = features.get(column) or {}
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    except (ValueError, AttributeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def describe_label(schema: pa.Schema, column: str) -> str:
    kind = schema.field(column).type
    if class_label_names(schema, column) is not None:
        return "class label"
    return {"int": "integer", "string": "string", "float": "float"}.get(
        label_kind(kind) or "", str(kind))


def unusable_label(parquet: ParquetSource, column: str) -> str | None:
    """Why `column` cannot be read as labels (a type that is none, types that differ
    between files), or None. Labels are optional: such a column is ignored, and
    stats.json and `islands validate` say why, rather than the run stopping."""
    kinds = set()
    for schema in parquet.schemas:
        kind = label_kind(schema.field(column).type)
        if kind is None:
            return (f"type {schema.field(column).type}; expected integers, strings or a "
                    "class label")
        kinds.add(kind)
    if len(kinds) > 1:
        return f"types differ between files ({', '.join(sorted(kinds))})"
    return None


@dataclass(frozen=True)
class LabelMap:
    column: str
    kind: str  # int, string or float
    names: tuple[str, ...] | None  # id -> name, when the labels have names

    def ids(self, array: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """int64 ids of a batch's labels, -1 where a row has none."""
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if self.kind == "string":
            assert self.names is not None
            found = pc.index_in(array, value_set=pa.array(self.names, array.type))
            return np.asarray(pc.fill_null(found, UNLABELLED).to_numpy(zero_copy_only=False),
                              np.int64)
        if self.kind == "float":
            values = np.asarray(array.to_numpy(zero_copy_only=False), np.float64)
            whole = ~np.isnan(values) & (np.floor(values) == values)  # others: no label
            out = np.full(len(values), UNLABELLED, np.int64)
            out[whole] = values[whole].astype(np.int64)
        else:
            out = np.array(pc.fill_null(pc.cast(array, pa.int64()), UNLABELLED)
                             .to_numpy(zero_copy_only=False), np.int64)
        out[out < 0] = UNLABELLED
        return out


def label_map(parquet: ParquetSource, column: str, max_rows: int | None) -> LabelMap:
    """How `column` (usable: see unusable_label) becomes ids; string names are gathered
    from the rows read (that column only), so that ids follow their sorted order."""
    kind = label_kind(parquet.schemas[0].field(column).type)
    assert kind is not None, unusable_label(parquet, column)
    if kind != "string":
        names = class_label_names(parquet.schemas[0], column)
        return LabelMap(column, kind, tuple(names) if names is not None else None)
    limit = max_rows or parquet.rows
    found: set[str] = set()
    for unit in parquet.units:
        if unit.first_row >= limit:
            break
        row = unit.first_row
        for batch in parquet.read(unit, [column], 65_536):
            values = batch.column(0)
            if pa.types.is_dictionary(values.type):
                values = values.dictionary_decode()
            values = values.slice(0, max(0, limit - row))
            found.update(value for value in pc.unique(values).to_pylist() if value is not None)
            row += batch.num_rows
    return LabelMap(column, kind, tuple(sorted(found)))
