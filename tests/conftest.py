"""Shared fixtures: one real Ray for the session, small configs on scikit-learn digits."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import ray
import yaml

from tests.flaky_fs import register as register_flaky

REPO = Path(__file__).resolve().parents[1]
TEST_ISLANDS = ("local-0", "local-1")
# The moto S3 server's address and dummy keys reach every process through one AWS config
# file: the session's Ray workers are told its path when Ray starts, which may be before
# the server does, and botocore reads it when a process first opens s3://.
AWS_CONFIG = Path(tempfile.gettempdir()) / f"islands-tests-{os.getpid()}-aws.ini"
BUCKET = "islands-test"


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once for the whole suite, with the virtual islands the configs name."""
    if not ray.is_initialized():
        # Workers register the test-only flaky:// filesystem, as the test process does.
        register_flaky()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 resources={f"island:{name}": 2.0 for name in TEST_ISLANDS},
                 runtime_env={"worker_process_setup_hook": "tests.flaky_fs.register",
                              "env_vars": {"PYTHONPATH": str(REPO),
                                           "AWS_CONFIG_FILE": str(AWS_CONFIG)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 for the session, with one empty bucket, reached through
    AWS_CONFIG_FILE by s3fs here, in the session's Ray workers and in drivers started as
    subprocesses. Yields the bucket's URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    AWS_CONFIG.write_text(f"[default]\naws_access_key_id = testing\naws_secret_access_key = "
                          f"testing\nregion = us-east-1\nendpoint_url = {endpoint}\n")
    os.environ["AWS_CONFIG_FILE"] = str(AWS_CONFIG)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    AWS_CONFIG.unlink(missing_ok=True)


def recipe(config: Any, image_channels: int = 1) -> Any:
    """The experts' recipe of `config`'s modality, for images of `image_channels`."""
    from orchestrator.modalities import modality_of

    return modality_of(config).expert_recipe(config, {"image_shape": [0, 0, image_channels]})


def tiny_config(storage: str, base: str = "tiny-digits", **sections: Any) -> dict[str, Any]:
    """configs/<base>.yaml with storage and any section keys replaced."""
    raw = yaml.safe_load((REPO / "configs" / f"{base}.yaml").read_text())
    raw["storage"] = storage
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


@pytest.fixture
def write_config(tmp_path: Path):
    def write(raw: dict[str, Any], name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture
def load_script(monkeypatch) -> Callable[[str], ModuleType]:
    """scripts/<name>.py imported from its file, in this process, and known as module `name`
    for the test (its dataclasses look their module up in sys.modules)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


def has_complete_checkpoint(checkpoints: Path) -> bool:
    """Whether an expert's checkpoints folder holds a complete checkpoint: its meta.json,
    written last, exists. Checkpoints are stored in the background, so a step folder can
    exist for a while before it is complete."""
    return checkpoints.exists() and any((step / "meta.json").exists()
                                        for step in checkpoints.iterdir())


@pytest.fixture(scope="session")
def serving_runs(ray_session, tmp_path_factory) -> dict[str, Path]:
    """Finished tiny image (digits, 2 experts) and text (2 experts) runs to serve."""
    from typer.testing import CliRunner

    from orchestrator.cli.main import app

    root = tmp_path_factory.mktemp("serving")
    runs = {}
    for base, modality in (("tiny-digits", "image"), ("tiny-text", "text")):
        path = root / f"{base}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(f"file://{root}/store", base=base)))
        result = CliRunner().invoke(app, ["run", str(path)])
        assert result.exit_code == 0, result.output
        runs[modality] = root / "store" / base
    return runs


def _served(serving_runs, tmp_path_factory, modality: str, *args: str):
    from tests.serve_servers import start_server, stop_server

    log = tmp_path_factory.mktemp("serve-logs") / f"{modality}.log"
    server = start_server(serving_runs[modality], log, *args)
    yield server
    stop_server(server)


# Small limits, so the 429 and 504 tests need few requests: 8 stepped together, 4 waiting.
SERVER_LIMITS = ("--max-inflight", "8", "--max-queue", "4")


@pytest.fixture(scope="session")
def image_server(serving_runs, tmp_path_factory):
    """`islands serve` of the image run, experts in the ingress (the default layout)."""
    yield from _served(serving_runs, tmp_path_factory, "image", *SERVER_LIMITS)


@pytest.fixture(scope="session")
def text_server(serving_runs, tmp_path_factory):
    yield from _served(serving_runs, tmp_path_factory, "text", *SERVER_LIMITS)
