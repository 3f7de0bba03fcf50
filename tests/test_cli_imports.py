"""Light verbs answer at once: `--help`, `validate`, `status` and `logs` import neither
torch, Ray nor scikit-learn (each is seconds and hundreds of MiB before anything runs).
`validate` alone may import pyarrow: it reads the data's Parquet footers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.state.config import config_to_yaml, parse_config
from orchestrator.state.manifest import STAGES, Manifest
from runstore import storage
from runstore.layout import RunLayout
from tests.conftest import REPO, tiny_config

HEAVY = ("torch", "ray", "sklearn", "transformers", "libp2p", "pyarrow")
PROBE = """
import json, sys
from orchestrator.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("\\nPROBE " + json.dumps({"code": code,
                              "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def imported_by(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    probe = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert probe, result.stdout + result.stderr
    return json.loads(probe[-1].removeprefix("PROBE "))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("light")
    config = parse_config(tiny_config(f"file://{root}/store"))
    layout = RunLayout(f"file://{root}/store/{config.run}")
    (root / "store" / config.run).mkdir(parents=True)
    (root / "store" / config.run / "config.yaml").write_text(config_to_yaml(config))
    Manifest.open(layout, config.run, config.clusters).save()
    return str(root / "store" / config.run)


@pytest.mark.parametrize("verb", ["--help", "validate", "status", "logs"])
def test_a_light_verb_imports_nothing_heavy(verb, run_dir):
    args = {"--help": ["--help"], "validate": ["validate", "configs/tiny-digits.yaml"],
            "status": ["status", run_dir], "logs": ["logs", run_dir, "--expert", "0"]}[verb]
    answer = imported_by(*args)
    assert answer["code"] in (0, None), answer
    allowed = {"pyarrow"} if verb == "validate" else set()
    heavy = [name for name in answer["heavy"] if name not in allowed]
    assert heavy == [], f"islands {verb} imported {heavy}"


def test_resuming_a_finished_run_imports_nothing_heavy(tmp_path):
    """A finished run's resume only verifies its artifacts: none of the stages' libraries
    (the pipeline imports them where a stage runs)."""
    config = parse_config(tiny_config(f"file://{tmp_path}/store"))
    layout = RunLayout(f"file://{tmp_path}/store/{config.run}")
    (tmp_path / "store" / config.run).mkdir(parents=True)
    (tmp_path / "store" / config.run / "config.yaml").write_text(config_to_yaml(config))
    manifest = Manifest.open(layout, config.run, config.clusters)
    for stage in STAGES:
        sha = storage.write_bytes(f"{layout.root}/{stage}/out.bin", stage.encode())
        manifest.finish_stage(stage, {f"{stage}/out.bin": sha})
    answer = imported_by("resume", str(tmp_path / "store" / config.run))
    assert answer["code"] in (0, None), answer
    assert answer["heavy"] == [], f"islands resume of a finished run imported {answer['heavy']}"
