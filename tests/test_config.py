import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.modalities import check_config
from orchestrator.state.config import load_config, parse_config
from runstore.errors import InputError
from tests.conftest import REPO, recipe, tiny_config

runner = CliRunner()


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.run
        check_config(config)  # and its modality can train it


def test_quickstart_defaults_fill_the_rest():
    config = load_config(REPO / "configs" / "quickstart-image.yaml")
    assert config.clusters == 4
    assert config.tracking.wandb == "auto"
    assert config.islands.address is None
    assert [s.name for s in config.islands.specs()] == ["local-0", "local-1"]


def test_unknown_key_is_named_with_its_dotted_path():
    with pytest.raises(InputError, match=r"experts\.stepz: unknown key"):
        parse_config(tiny_config("file:///x", experts={"stepz": 3}))


def test_wrong_type_names_field_and_expectation():
    with pytest.raises(InputError, match=r"partition\.clusters: .*integer"):
        parse_config(tiny_config("file:///x", partition={"clusters": "four"}))


def test_missing_run_name_is_refused():
    raw = tiny_config("file:///x")
    del raw["run"]
    with pytest.raises(InputError, match=r"run: required field is missing"):
        parse_config(raw)


def test_monolith_switch_forces_one_cluster():
    config = parse_config(tiny_config("file:///x", experts={"monolith": True}))
    assert config.clusters == 1


def test_warmup_follows_short_runs_and_longer_than_the_run_is_refused():
    assert parse_config(tiny_config("file:///x")).experts.warmup_steps == 3  # 30 steps
    assert parse_config(tiny_config("file:///x", experts={"steps": 5000})).experts \
        .warmup_steps == 100
    assert parse_config(tiny_config("file:///x", experts={"warmup_steps": 7})).experts \
        .warmup_steps == 7
    with pytest.raises(InputError, match=r"experts: warmup_steps \(50\) is more than steps "
                                         r"\(30\)"):
        parse_config(tiny_config("file:///x", experts={"warmup_steps": 50}))


def test_snapshot_fractions_outside_0_1_are_refused():
    experts = parse_config(tiny_config("file:///x", experts={"snapshot_at": [1.0, 0.25]})).experts
    assert experts.snapshot_at == (0.25, 1.0) and experts.lr_schedule == "cosine"
    with pytest.raises(InputError, match=r"experts\.snapshot_at: expected fractions of steps "
                                         r"in \(0, 1\], not \[0\.0, 1\.5\]"):
        parse_config(tiny_config("file:///x", experts={"snapshot_at": [0.0, 0.5, 1.5]}))


def test_validate_cli_exit_codes(write_config, tmp_path: Path):
    good = write_config(tiny_config(f"file://{tmp_path}"))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    bad = write_config(tiny_config(f"file://{tmp_path}", router={"steps": -1}), "bad.yaml")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "router.steps" in result.output
    assert "Traceback" not in result.output


def test_an_unregistered_modality_is_refused_before_anything_is_written(write_config,
                                                                       tmp_path: Path):
    raw = tiny_config(f"file://{tmp_path}/store", data={"modality": "audio"})
    for verb in ("validate", "run"):
        result = runner.invoke(app, [verb, str(write_config(raw))])
        assert result.exit_code == 2, result.output
        assert "data.modality: unknown modality 'audio'; expected one of image, text" \
            in " ".join(result.output.split())
    assert not (tmp_path / "store").exists()


def test_validate_cli_refuses_missing_file_and_bad_yaml(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    result = runner.invoke(app, ["validate", str(broken)])
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_island_hardware_sets_workers_threads_and_memory():
    config = load_config(REPO / "configs" / "islands-gpu.yaml")
    h100, a100, _, v100 = config.islands.pool
    assert (h100.slots, h100.data_parallel, h100.threads(1)) == (2, 4, 12)
    assert (a100.data_parallel, a100.worker_memory_gb) == (4, 40)
    assert v100.node_labels == {"site": "basement"} and v100.speed is None


@pytest.mark.parametrize(("pool", "expected"), [
    ([{"name": "a", "speed": 1.0}, {"name": "b"}], "give every island a speed, or none"),
    ([{"name": "a", "slots": 3, "workers": 2, "accelerators": {"type": "A100", "count": 4,
                                                 "memory_gb": 40}}], "exceeds its 4"),
    ([{"name": "a"}, {"name": "a"}], "unique"),
    ([{"name": "a", "accelerators": {"type": "A100", "count": 2}}], "memory_gb"),
])
def test_bad_islands_are_refused_by_field(pool, expected):
    with pytest.raises(InputError, match=expected) as err:
        parse_config({"run": "x", "islands": {"pool": pool}})
    assert "islands" in str(err.value)


@pytest.mark.parametrize("background", [True, False])
def test_checkpoint_mode_reaches_the_worker(background):
    from orchestrator.control.expert_specs import expert_spec
    from orchestrator.state.config import IslandSpec
    from runstore.layout import RunLayout

    config = parse_config(tiny_config("file:///x", experts={"async_checkpoints": background}))
    spec = expert_spec(config, RunLayout("file:///x/run"), 0, IslandSpec(name="a"), recipe(config))
    assert spec.async_checkpoints is background


@pytest.mark.parametrize("base, sections, expected", [
    ("tiny-text", {"experts": {"model": "unet"}},
     "experts.model: 'unet' is a model for image data; text runs expect byte_lm"),
    ("tiny-digits", {"experts": {"model": "byte_lm"}},
     "experts.model: 'byte_lm' is a model for text data; image runs expect unet"),
    # digits are 8x8: 8 -> 4 -> 2 -> 1, so a fifth level would halve a 1x1 map.
    ("tiny-digits", {"experts": {"channel_mult": [1, 2, 2, 2, 2]}},
     "experts.channel_mult: 5 levels halve the image 4 times, but the images of "
     "builtin:digits are 8x8, 8 pixels across after experts.patch 1: expected at most 4 "
     "levels"),
    ("tiny-digits", {"experts": {"channel_mult": [1, 2, 2], "patch": 4}},
     "expected at most 2 levels (each halving needs 2 pixels), such as [1, 2]"),
    ("tiny-digits", {"experts": {"channel_mult": []}}, "experts.channel_mult: "),
    ("tiny-digits", {"experts": {"channel_mult": [1, 0]}}, "experts.channel_mult.1: "),
    ("tiny-text", {"eval": {"prefix_bytes": 64}},
     "eval.prefix_bytes: 64 leaves nothing to score: eval scores the bytes after it within "
     "the experts' context of 64 (experts.context); expected fewer than 64"),
])
def test_what_a_modality_cannot_train_is_refused_before_ray(write_config, tmp_path: Path,
                                                            base, sections, expected):
    raw = tiny_config(f"file://{tmp_path}/store", base=base, **sections)
    for verb in ("validate", "run", "submit"):
        result = runner.invoke(app, [verb, str(write_config(raw))])
        assert result.exit_code == 2, (verb, result.output)
        assert expected in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "store").exists()  # nothing written, no driver started


def test_a_unet_too_deep_for_parquet_images_is_refused_at_partition(write_config, tmp_path):
    """A Parquet dataset's image size is known once read: the partition stage refuses the
    U-Net before it counts as done, so the fixed config is taken for the same run."""
    flat = np.random.default_rng(0).integers(0, 255, size=(60, 64)).astype(np.uint8)
    pq.write_table(pa.table({"image": pa.array(flat.tolist(), type=pa.list_(pa.uint8()))}),
                   str(tmp_path / "arrays.parquet"))
    data = {"source": f"file://{tmp_path}/arrays.parquet", "label_column": None}
    raw = tiny_config(f"file://{tmp_path}/store", run="deep", data=data,
                      experts={"channel_mult": [1, 1, 1, 1, 1]})
    assert runner.invoke(app, ["validate", str(write_config(raw))]).exit_code == 0
    result = runner.invoke(app, ["run", str(write_config(raw)), "--until", "experts"])
    assert result.exit_code == 2, result.output
    assert f"the images of file://{tmp_path}/arrays.parquet are 8x8" in \
        " ".join(result.output.split())
    manifest = json.loads((tmp_path / "store" / "deep" / "manifest.json").read_text())
    assert manifest["stages"]["partition"]["state"] == "failed"
    assert manifest["stages"]["experts"]["state"] == "pending"
    raw["experts"]["channel_mult"] = [1, 1, 1, 1]
    result = runner.invoke(app, ["run", str(write_config(raw)), "--until", "partition"])
    assert result.exit_code == 0, result.output


def test_the_seed_model_trains_at_its_own_batch_when_given():
    from orchestrator.control.expert_specs import seed_overrides

    plain = parse_config(tiny_config("file:///x", experts={"seed_steps": 4}))
    assert "batch_size" not in seed_overrides(plain, 2)
    wide = parse_config(tiny_config("file:///x", experts={"seed_steps": 4, "seed_batch_size": 64}))
    assert seed_overrides(wide, 2) == {"steps": 4, "shard_clusters": (0, 1), "batch_size": 64}
