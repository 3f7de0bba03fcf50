"""Data as users bring it, through the CLI: `islands run` to completion on a Hugging Face
style export, an image folder, JSONL and a folder of .txt files (tiny configs), and
`islands validate` reading the data's schema, on real files built here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli.main import app
from tests.conftest import tiny_config

runner = CliRunner()
FAST = {"experts": {"steps": 20, "checkpoint_every": 10}, "router": {"steps": 10},
        "eval": {"heldout_rows": 16}}
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def picture(seed: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Image.Image:
    """Bright or dark images by seed parity: two families for k-means to find."""
    rng = np.random.default_rng(seed)
    base = 200 if seed % 2 else 40
    pixels = np.clip(base + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def hf_snapshot(root: Path) -> Path:
    """A snapshot folder as `datasets` exports it: split shards of Image structs, string
    labels with nulls, a dataset card beside them."""
    data = root / "snapshot" / "data"
    data.mkdir(parents=True)
    (root / "snapshot" / "README.md").write_text("---\nlicense: mit\n---\n")
    seeds = iter(range(1000))
    for name, rows in (("train-00000-of-00002", 40), ("train-00001-of-00002", 40),
                       ("test-00000-of-00001", 10)):
        images, labels = [], []
        for row in range(rows):
            seed = next(seeds)
            images.append({"bytes": png(picture(seed)), "path": f"{seed}.png"})
            labels.append(None if row % 10 == 3 else ("bright" if seed % 2 else "dark"))
        pq.write_table(pa.table({"image": pa.array(images, HF_IMAGE), "label": labels}),
                       data / f"{name}.parquet")
    return root / "snapshot"


def image_folder(root: Path) -> Path:
    """ImageFolder layout: PNG and JPEG, sizes 8x8 and 10x8, RGB, grey, palette, RGBA."""
    for index in range(60):
        label = "cat" if index % 2 else "dog"
        folder = root / "photos" / label
        folder.mkdir(parents=True, exist_ok=True)
        image = picture(index, (10, 8) if index % 3 == 0 else (8, 8),
                        ("RGB", "L", "P", "RGBA")[index % 4])
        if index % 5 == 0 and image.mode in ("RGB", "L"):
            image.save(folder / f"{index}.jpg", quality=95)
        else:
            image.save(folder / f"{index}.png")
    return root / "photos"


def run(root: Path, raw: dict) -> tuple[dict, str]:
    """`islands run` on `raw` written to root/config.yaml; the partition's stats."""
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    stats = json.loads((root / "store" / raw["run"] / "partition" / "stats.json").read_text())
    return stats, result.output


def test_hf_export_with_struct_images_string_labels_nulls_and_splits(ray_session, tmp_path):
    hf_snapshot(tmp_path)
    raw = tiny_config(f"file://{tmp_path}/store", run="hf", **FAST,
                      data={"source": "snapshot", "split": "train"})  # beside the config
    stats, output = run(tmp_path, raw)
    assert stats["rows"] == 80 and stats["image_shape"] == [8, 8, 3]
    assert stats["label_names"] == ["bright", "dark"] and stats["unlabelled_rows"] == 8
    assert sum(map(sum, stats["label_histogram"])) + 8 <= 80
    assert "complete" in output


def test_image_folder_of_mixed_sizes_and_modes(ray_session, tmp_path):
    image_folder(tmp_path)
    raw = tiny_config(f"file://{tmp_path}/store", run="folder", **FAST,
                      data={"source": str(tmp_path / "photos"), "channels": 3,
                            "image_size": 8})
    stats, _ = run(tmp_path, raw)
    assert stats["rows"] == 60 and stats["image_shape"] == [8, 8, 3]
    assert stats["label_names"] == ["cat", "dog"] and stats["unlabelled_rows"] == 0
    fixes = stats["decode_fixes"]
    assert fixes["resized"] == 20 and fixes["palette"] == 15 and fixes["alpha"] == 15
    assert fixes["mode"] == 15  # the grey ones, to RGB
    assert len(list((tmp_path / "store" / ".datasets").iterdir())) == 1


@pytest.mark.parametrize("form", ["jsonl", "txt"])
def test_text_files_run(ray_session, tmp_path, form):
    words = ["river", "stone", "cloud", "engine", "garden", "signal", "harbor", "winter"]
    texts = []
    for index in range(240):
        rng = np.random.default_rng(index)
        text = " ".join(rng.choice(words[:4] if index % 2 else words[4:], 12))
        texts.append("" if index % 40 == 7 else text)
    if form == "jsonl":
        source = tmp_path / "docs.jsonl"
        source.write_text("\n".join(json.dumps({"text": text, "id": index})
                                    for index, text in enumerate(texts)) + "\n")
    else:  # a folder of .txt files, a document per line
        source = tmp_path / "notes"
        (source / "b").mkdir(parents=True)
        (source / "a.txt").write_text("\n".join(texts[:100]) + "\n")
        (source / "b" / "c.txt").write_text("\n".join(texts[100:]) + "\n")
    raw = tiny_config(f"file://{tmp_path}/store", base="tiny-text", run=form,
                      data={"source": str(source), "modality": "text"},
                      experts={"steps": 20, "checkpoint_every": 10},
                      eval={"heldout_rows": 16})
    stats, _ = run(tmp_path, raw)
    assert stats["rows"] == 240 and stats["dropped_rows"] == 6
    assert sum(stats["sizes"]) + sum(stats["heldout_sizes"]) == 234


def validate(tmp_path: Path, **data: object):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}/store", data=data)))
    return runner.invoke(app, ["validate", str(config)])


def test_validate_prints_the_data_line(tmp_path):
    hf_snapshot(tmp_path)
    result = validate(tmp_path, source="snapshot", split="train")
    assert result.exit_code == 0, result.output
    assert ("data: 80 rows, image column 'image' (HF Image struct), label 'label' (string), "
            "split train") in result.output
    image_folder(tmp_path)
    result = validate(tmp_path, source="photos", image_size=8, channels=3)
    assert result.exit_code == 0, result.output
    assert "data: 60 image files" in result.output and "2 class folders (cat, dog)" in \
        result.output
    assert not (tmp_path / "store").exists()  # validate writes nothing


@pytest.mark.parametrize("case, expected", [
    ("missing_column", "data.image_column: column 'picture' not in"),
    ("unreadable", "not a readable Parquet file"),
    ("missing_source", "does not exist"),
    ("splits_without_split", "data.split:"),
])
def test_validate_refuses_bad_data_in_one_line(tmp_path, case, expected):
    if case == "missing_column":
        hf_snapshot(tmp_path)
        result = validate(tmp_path, source="snapshot", split="test", image_column="picture")
    elif case == "unreadable":
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
        result = validate(tmp_path, source="broken.parquet")
    elif case == "missing_source":
        result = validate(tmp_path, source="nowhere")
    else:
        hf_snapshot(tmp_path)
        result = validate(tmp_path, source="snapshot")
        assert "test, train" in result.output
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, \
        result.output
