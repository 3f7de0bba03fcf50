from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import load_config, parse_config
from runstore.errors import InputError
from tests.conftest import REPO, tiny_config

runner = CliRunner()


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.run


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


def test_validate_cli_exit_codes(write_config, tmp_path: Path):
    good = write_config(tiny_config(f"file://{tmp_path}"))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    bad = write_config(tiny_config(f"file://{tmp_path}", router={"steps": -1}), "bad.yaml")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "router.steps" in result.output
    assert "Traceback" not in result.output


def test_validate_cli_refuses_missing_file_and_bad_yaml(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    result = runner.invoke(app, ["validate", str(broken)])
    assert result.exit_code == 2 and "not valid YAML" in result.output
