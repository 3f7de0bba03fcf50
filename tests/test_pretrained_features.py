"""Pretrained image features (dinov2, clip) through `islands partition`, on tiny randomly
initialised models of the real architectures saved as a local model folder."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from orchestrator.cli.main import app
from partitioner.features import (
    load_extractor,
    make_extractor,
    safetensors_metadata,
    save_extractor_state,
)
from partitioner.image_datasets import BUILTINS
from runstore.errors import InputError
from tests.conftest import tiny_config

runner = CliRunner()
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def save_dinov2(folder: Path, seed: int = 0) -> None:
    """A DINOv2 with its image processor (the processor path)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)


def save_clip(folder: Path) -> None:
    """A full CLIP (text tower too) without an image processor (the fallback path)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, projection_dim=16)
    vision = CLIPVisionConfig(**TINY, projection_dim=16)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         projection_dim=16)).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    save_dinov2(root / "dinov2")
    save_clip(root / "clip")
    return {"dinov2": root / "dinov2", "clip": root / "clip"}


def partition(tmp_path: Path, features: str, model_path: str, run: str = "first"):
    """`islands partition` on the first 240 builtin digits."""
    config = tiny_config(f"file://{tmp_path}/store", run=run, data={"max_rows": 240},
                         partition={"features": features, "model_path": model_path})
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return runner.invoke(app, ["partition", str(path)]), tmp_path / "store" / run


@pytest.mark.parametrize("features,dim", [("dinov2", 32), ("clip", 16)])
def test_partition_by_pretrained_features(tmp_path, models, features, dim):
    first, run = partition(tmp_path, features, str(models[features]))
    assert first.exit_code == 0, first.output
    stats = json.loads((run / "partition" / "stats.json").read_text())
    assert stats["features"] == features and len(stats["sizes"]) == 2
    assert stats["balance_ratio"] <= 1.1 + 1e-9  # balance_eps 0.1
    assert sum(stats["sizes"]) + sum(stats["heldout_sizes"]) == stats["rows"]
    assert load_file(run / "partition" / "centroids.safetensors")["centroids"].shape == (2, dim)

    # The saved state names the model and its hashes, and embeds new images the same way.
    data = (run / "partition" / "features.safetensors").read_bytes()
    meta = json.loads(safetensors_metadata(data)["islands"])
    assert meta["model_path"] == str(models[features]) and len(meta["config_sha256"]) == 64
    images = BUILTINS["digits"]()[0][:70, :, :, None]
    again = load_extractor(data).transform(images)
    assert again.shape == (70, dim) and again.dtype == np.float32
    assert np.isfinite(again).all() and again.std(axis=0).max() > 0

    # The same config twice: the same clusters, byte for byte.
    second, run_again = partition(tmp_path, features, str(models[features]), "second")
    assert second.exit_code == 0, second.output
    for name in ("centroids.safetensors", "features.safetensors",
                 "shards/cluster=0/part-0.parquet", "shards/cluster=1/part-0.parquet"):
        assert (run / "partition" / name).read_bytes() == \
            (run_again / "partition" / name).read_bytes(), name


def test_a_different_model_under_the_recorded_path_is_refused(tmp_path, models):
    folder = tmp_path / "dinov2"
    save_dinov2(folder)
    data = save_extractor_state("dinov2", make_extractor("dinov2", 16, 0, "image", str(folder)))
    assert load_extractor(data).hashes["weights_sha256"] == \
        json.loads(safetensors_metadata(data)["islands"])["weights_sha256"]
    save_dinov2(folder, seed=1)  # other weights, same config
    with pytest.raises(InputError, match="weights_sha256"):
        load_extractor(data)


def test_a_missing_model_is_one_line_with_exit_2(tmp_path):
    absent = tmp_path / "no-such-model"
    result, _ = partition(tmp_path, "dinov2", str(absent))
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert f"partition.model_path: no model at '{absent}'" in line
    assert "hf download facebook/dinov2-small --local-dir" in line
    assert "Traceback" not in result.output
    # A hub id absent from the local cache: the same, never a download.
    result, _ = partition(tmp_path, "clip", "nobody-here/no-such-clip")
    assert result.exit_code == 2 and "nobody-here/no-such-clip" in result.output
    assert "openai/clip-vit-base-patch32" in result.output


def test_validate_asks_for_the_model_and_other_features_refuse_one(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}/store",
                                               partition={"features": "clip"})))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "partition.model_path: features 'clip' need a model" in result.output
    result, _ = partition(tmp_path, "pixels", "x")
    assert result.exit_code == 2 and "partition.model_path: is read only by the features " \
        "dinov2, clip" in " ".join(result.output.split())


def test_a_hub_id_resolves_in_the_local_cache_only(tmp_path, models, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny--dinov2"
    shutil.copytree(models["dinov2"], repo / "snapshots" / "c0ffee")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    extractor = make_extractor("dinov2", 16, 0, "image", "tiny/dinov2")
    assert extractor.folder == (repo / "snapshots" / "c0ffee").resolve()
    images = BUILTINS["digits"]()[0][:3, :, :, None]
    assert extractor.fit(images).transform(images).shape == (3, 32)
    with pytest.raises(InputError, match="no model at 'tiny/other'"):
        make_extractor("dinov2", 16, 0, "image", "tiny/other")
    with pytest.raises(InputError, match="is a 'dinov2' model; features 'clip' expect"):
        make_extractor("clip", 16, 0, "image", "tiny/dinov2")
