"""Data as users hold it, decoded to the pixels and labels the partition stage trains on:
real files built here with PIL and pyarrow, read through the stage's own readers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.pipeline import partition_request
from orchestrator.state.config import parse_config
from partitioner.image_datasets import read_image_rows
from partitioner.image_decode import FIX_BIT, ImageOptions, decode_image
from partitioner.row_source import RowBatch
from partitioner.text_datasets import read_text_rows
from runstore.errors import InputError


def encoded(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def request(tmp_path: Path, source: Path | str, **data: object):
    raw = {"run": "r", "storage": f"file://{tmp_path}/store",
           "data": {"source": str(source), **data}, "partition": {"clusters": 2}}
    if data.get("modality") == "text":
        raw["experts"] = {"context": 16, "width": 16, "heads": 2}
    return partition_request(parse_config(raw))


def read_all(rows) -> tuple[RowBatch, dict]:
    """Every row through the stage's reader, and the stats its summary writes."""
    batches = list(rows.batches(1024))
    summary = rows.summary(2)
    for batch in batches:
        summary.add(batch, np.zeros(len(batch), np.int64))
    return RowBatch.concat(batches), summary.result()


def refused(call, field: str) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and field in message, message
    return message


def test_palette_png_is_converted_not_read_as_indices():
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    pixels, fixes = decode_image(encoded(palette), ImageOptions())
    assert pixels.shape == (4, 4, 3) and fixes == FIX_BIT["palette"]
    assert pixels[1, 1].tolist() == [200, 100, 50] and pixels[0, 0].tolist() == [0, 0, 0]


def test_16bit_png_is_scaled_to_8_bits_not_truncated():
    values = np.array([[0, 257 * 128], [65535, 257 * 3]], np.uint16)
    pixels, fixes = decode_image(encoded(Image.fromarray(values)), ImageOptions())
    assert fixes == FIX_BIT["16bit"]
    assert pixels[..., 0].tolist() == [[0, 128], [255, 3]]  # the low byte would be 128, 255


def test_rgba_is_composited_on_black():
    image = np.zeros((2, 2, 4), np.uint8)
    image[..., :3] = 200
    image[..., 3] = [[255, 0], [128, 255]]
    pixels, fixes = decode_image(encoded(Image.fromarray(image, "RGBA")), ImageOptions())
    assert fixes == FIX_BIT["alpha"] and pixels.shape == (2, 2, 3)
    assert pixels[..., 0].tolist() == [[200, 0], [100, 200]]


def test_jpeg_with_exif_orientation_6_is_turned_upright():
    wide = np.zeros((16, 32), np.uint8)
    wide[:, :8] = 255  # a bright left edge: after a quarter turn clockwise it is the top
    exif = Image.Exif()
    exif[0x0112] = 6
    blob = encoded(Image.fromarray(wide), "JPEG", exif=exif.tobytes(), quality=95)
    pixels, fixes = decode_image(blob, ImageOptions())
    assert fixes == FIX_BIT["exif"] and pixels.shape == (32, 16, 1)
    assert pixels[:8].mean() > 200 and pixels[-8:].mean() < 50


@pytest.mark.parametrize("mode", ["center_crop", "pad", "stretch"])
def test_mixed_sizes_are_brought_to_image_size(mode):
    tall = np.full((12, 6), 255, np.uint8)
    pixels, fixes = decode_image(encoded(Image.fromarray(tall)),
                                 ImageOptions(image_size=6, resize=mode))
    assert pixels.shape == (6, 6, 1) and fixes == FIX_BIT["resized"]
    if mode == "pad":  # scaled to 3 wide, black either side
        assert pixels[:, 0].max() == 0 and pixels[:, 3].min() == 255
    else:
        assert pixels.min() == 255


def write_images(path: Path, images: list[Image.Image], labels: list | None = None) -> Path:
    columns = {"image": pa.array([encoded(image) for image in images], pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(labels)
    pq.write_table(pa.table(columns), path)
    return path


def test_mixed_sizes_and_colours_refused_without_the_field_that_fixes_them(tmp_path):
    sizes = write_images(tmp_path / "sizes.parquet", [Image.fromarray(rgb(8, 8)),
                                                      Image.fromarray(rgb(6, 10))])
    refused(lambda: read_all(read_image_rows(request(tmp_path, sizes))), "data.image_size")
    batch, stats = read_all(read_image_rows(request(tmp_path, sizes, image_size=8,
                                                    resize="pad")))
    assert batch.items.shape == (2, 8, 8, 3) and stats["decode_fixes"]["resized"] == 1

    colours = write_images(tmp_path / "colours.parquet",
                           [Image.fromarray(rgb(4, 4)), Image.fromarray(rgb(4, 4)[..., 0])])
    refused(lambda: read_all(read_image_rows(request(tmp_path, colours))), "data.channels")
    batch, stats = read_all(read_image_rows(request(tmp_path, colours, channels=1)))
    assert batch.items.shape == (2, 4, 4, 1) and stats["decode_fixes"]["mode"] == 1
    batch, stats = read_all(read_image_rows(request(tmp_path, colours, channels=3)))
    assert batch.items.shape == (2, 4, 4, 3)
    assert (batch.items[1, ..., 0] == batch.items[1, ..., 2]).all()  # grey spread over RGB


def test_hf_image_struct_with_string_labels_and_nulls(tmp_path):
    images = [rgb(4, 4, seed) for seed in range(4)]
    struct = pa.array([{"bytes": encoded(Image.fromarray(image)), "path": f"{i}.png"}
                       for i, image in enumerate(images)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path = tmp_path / "export.parquet"
    pq.write_table(pa.table({"image": struct, "label": ["dog", None, "cat", "dog"]}), path)
    rows = read_image_rows(request(tmp_path, path))
    batch, stats = read_all(rows)
    assert np.array_equal(batch.items, np.stack(images))
    assert batch.columns["label"].tolist() == [1, -1, 0, 1]
    taken = RowBatch.concat(list(rows.take(np.array([1, 3]), 1024)))  # sliced structs
    assert np.array_equal(taken.items, np.stack([images[1], images[3]]))
    assert stats["label_names"] == ["cat", "dog"] and stats["unlabelled_rows"] == 1
    assert stats["label_histogram"] == [[1, 2], [0, 0]]  # the unlabelled row is in no bin


def test_class_label_names_come_from_the_hf_metadata(tmp_path):
    table = pa.table({"image": [encoded(Image.fromarray(rgb(4, 4)))] * 2,
                      "label": pa.array([1, 0], pa.int64())})
    meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["no", "yes"]}}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, tmp_path / "x.parquet")
    _, stats = read_all(read_image_rows(request(tmp_path, tmp_path / "x.parquet")))
    assert stats["label_names"] == ["no", "yes"] and stats["unlabelled_rows"] == 0


def test_image_folder_subfolders_are_labels_converted_once(tmp_path):
    for label, seed in (("cat", 1), ("cat", 2), ("dog", 3)):
        folder = tmp_path / "photos" / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(5, 5, seed)).save(folder / f"{seed}.png")
    batch, stats = read_all(read_image_rows(request(tmp_path, tmp_path / "photos")))
    assert batch.items.shape == (3, 5, 5, 3) and stats["label_names"] == ["cat", "dog"]
    assert batch.columns["label"].tolist() == [0, 0, 1]
    converted = list((tmp_path / "store" / ".datasets").iterdir())
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns
    read_all(read_image_rows(request(tmp_path, tmp_path / "photos")))
    assert list((tmp_path / "store" / ".datasets").iterdir()) == converted
    assert converted[0].stat().st_mtime_ns == stamp  # found, not converted again


def test_split_files_refused_without_split_and_chosen_with_it(tmp_path):
    snapshot = tmp_path / "snapshot" / "data"
    snapshot.mkdir(parents=True)
    (tmp_path / "snapshot" / "README.md").write_text("a dataset card")
    (tmp_path / "snapshot" / ".cache").mkdir()  # a Hub download's bookkeeping: not data
    write_images(tmp_path / "snapshot" / ".cache" / "validation.parquet",
                 [Image.fromarray(rgb(4, 4))])
    for name, count in (("train-00000-of-00002", 2), ("train-00001-of-00002", 1),
                        ("test-00000-of-00001", 4)):
        write_images(snapshot / f"{name}.parquet",
                     [Image.fromarray(rgb(4, 4, i)) for i in range(count)])
    message = refused(lambda: read_image_rows(request(tmp_path, tmp_path / "snapshot")),
                      "data.split")
    assert "test, train" in message
    assert read_image_rows(request(tmp_path, tmp_path / "snapshot", split="train")).count == 3
    assert read_image_rows(request(tmp_path, tmp_path / "snapshot", split="test")).count == 4
    refused(lambda: read_image_rows(request(tmp_path, tmp_path / "snapshot", split="dev")),
            "data.split")
    refused(lambda: read_image_rows(request(tmp_path, "builtin:digits", split="train")),
            "data.split")


def test_glob_of_parquet_and_of_images(tmp_path):
    for index in range(3):
        write_images(tmp_path / f"part-{index}.parquet", [Image.fromarray(rgb(4, 4, index))])
    assert read_image_rows(request(tmp_path, tmp_path / "part-*.parquet")).count == 3
    nested = tmp_path / "shots" / "a" / "b"
    nested.mkdir(parents=True)
    Image.fromarray(rgb(4, 4)).save(nested / "x.jpg")
    Image.fromarray(rgb(4, 4)).save(tmp_path / "shots" / "y.jpg")
    (tmp_path / "shots" / "z.png").write_bytes(b"")
    batch, _ = read_all(read_image_rows(request(tmp_path, f"{tmp_path}/shots/**/*.jpg")))
    assert batch.items.shape == (2, 4, 4, 3)


def test_jsonl_and_txt_with_both_text_units_drop_empty_texts(tmp_path):
    lines = [{"text": "first document"}, {"text": ""}, {"body": "no text field"},
             {"text": "second document"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    batch, stats = read_all(read_text_rows(request(tmp_path, tmp_path / "docs.jsonl",
                                                   modality="text")))
    assert batch.items == ["first document", "second document"]
    assert stats["dropped_rows"] == 2
    batch, _ = read_all(read_text_rows(request(tmp_path, tmp_path / "docs.jsonl",
                                               modality="text", text_column="body")))
    assert batch.items == ["no text field"]

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one line\n\nanother line\n")
    (corpus / "b.txt").write_text("a whole\nfile\n")
    batch, stats = read_all(read_text_rows(request(tmp_path, corpus, modality="text")))
    assert batch.items == ["one line", "another line", "a whole", "file"]
    assert stats["dropped_rows"] == 1
    batch, stats = read_all(read_text_rows(request(tmp_path, corpus, modality="text",
                                                   text_unit="file")))
    assert batch.items == ["one line\n\nanother line\n", "a whole\nfile\n"]
    assert stats["dropped_rows"] == 0


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    message = refused(lambda: read_text_rows(request(tmp_path, tmp_path / "bad.jsonl",
                                                     modality="text")), "bad.jsonl line 2")
    assert "JSON" in message


def test_new_fields_are_checked_by_the_config():
    for data, field in (({"channels": 2}, "data.channels"), ({"image_size": 0},
                        "data.image_size"), ({"resize": "zoom"}, "data.resize"),
                        ({"text_unit": "page"}, "data.text_unit"),
                        ({"split": "../x"}, "data.split")):
        refused(lambda data=data: parse_config({"run": "r", "data": data}), field)


def test_hf_struct_rows_with_only_a_path_read_the_file(tmp_path):
    """`Dataset.to_parquet` keeps images loaded from local files as paths, not bytes."""
    folder = tmp_path / "export"
    folder.mkdir()
    pixels = rgb(4, 4, 7)
    Image.fromarray(pixels).save(tmp_path / "absolute.png")
    Image.fromarray(pixels[::-1]).save(folder / "relative.png")
    struct = pa.array([{"bytes": None, "path": str(tmp_path / "absolute.png")},
                       {"bytes": None, "path": "relative.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct}), folder / "train.parquet")
    source = folder / "train.parquet"  # relative paths are under its folder
    batch, _ = read_all(read_image_rows(request(tmp_path, source)))
    assert np.array_equal(batch.items, np.stack([pixels, pixels[::-1]]))
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "gone.png"}],
                                               struct.type)}), folder / "train.parquet")
    refused(lambda: read_all(read_image_rows(request(tmp_path, source))), "gone.png")


def test_image_folder_and_split_files_on_s3(s3_bucket, tmp_path):
    """Listing, ImageFolder labels, splits and the conversion, on an object store."""
    from runstore import storage

    prefix = f"{s3_bucket}/sources-{tmp_path.name}"
    for split, label, seed in (("train", "cat", 1), ("train", "dog", 2), ("test", "cat", 3)):
        storage.write_bytes(f"{prefix}/photos/{split}/{label}/{seed}.png",
                            encoded(Image.fromarray(rgb(4, 4, seed))))
    raw = {"run": "r", "storage": f"{prefix}/store",
           "data": {"source": f"{prefix}/photos", "split": "train"}}
    batch, stats = read_all(read_image_rows(partition_request(parse_config(raw))))
    assert batch.items.shape == (2, 4, 4, 3) and stats["label_names"] == ["cat", "dog"]
    fs, root = storage.filesystem(f"{prefix}/store/.datasets")
    converted = fs.ls(root)
    assert len(converted) == 1
    read_all(read_image_rows(partition_request(parse_config(raw))))
    assert fs.ls(root) == converted  # found by its fingerprint, not converted again
    raw["data"]["split"] = None
    refused(lambda: read_image_rows(partition_request(parse_config(raw))), "data.split")


def test_label_problems_never_stop_a_read(tmp_path):
    image = encoded(Image.fromarray(rgb(4, 4)))
    pq.write_table(pa.table({"image": [image] * 3, "label": [[1], [2], None]}),
                   tmp_path / "boxes.parquet")
    batch, stats = read_all(read_image_rows(request(tmp_path, tmp_path / "boxes.parquet")))
    assert "label" not in batch.columns and stats["label_histogram"] is None
    assert stats["label_column_ignored"].startswith("'label': type list<")
    pq.write_table(pa.table({"image": [image] * 4, "label": [1.0, 2.5, float("nan"), -3.0]}),
                   tmp_path / "floats.parquet")
    batch, stats = read_all(read_image_rows(request(tmp_path, tmp_path / "floats.parquet")))
    assert batch.columns["label"].tolist() == [1, -1, -1, -1]
    assert stats["unlabelled_rows"] == 3


def test_text_parquet_split_files(tmp_path):
    for split, texts in (("train", ["a text", "", "another text"]), ("test", ["held"])):
        pq.write_table(pa.table({"text": texts}), tmp_path / f"{split}-00000-of-00001.parquet")
    refused(lambda: read_text_rows(request(tmp_path, tmp_path, modality="text")),
            "data.split")
    batch, stats = read_all(read_text_rows(request(tmp_path, tmp_path, modality="text",
                                                   split="train")))
    assert batch.items == ["a text", "another text"] and stats["dropped_rows"] == 1
