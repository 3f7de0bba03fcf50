"""What a Ray job's runtime_env carries from the submitter: settings by default, never a
credential (Ray shows runtime_env in its dashboard and `ray job list`); a variable named
with --forward-env, with a warning that it is exposed there.

Ray's job client is replaced by a recorder: everything up to the job's submission is the
real code path of `islands submit` and `islands resume`, cheaply, with no cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.control import submit as submit_module
from orchestrator.control.submit import FORWARDED_ENV, job_env
from orchestrator.state.manifest import Manifest
from runstore.errors import InputError
from runstore.layout import RunLayout
from tests.conftest import tiny_config

runner = CliRunner()
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "aws-secret",
           "AWS_SESSION_TOKEN": "aws-session", "WANDB_API_KEY": "wandb-secret"}
SETTINGS = {"WANDB_MODE": "online", "WANDB_ENTITY": "lab", "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL_S3": "http://minio:9000"}
ADDRESS = "http://head.invalid:8265"


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_job_env_forwards_settings_and_no_secret() -> None:
    env = job_env(environ={**SECRETS, **SETTINGS, "HOME": "/home/u"})
    assert env == SETTINGS
    assert not set(SECRETS) & set(FORWARDED_ENV)


def test_job_env_forwards_what_is_named() -> None:
    environ = {**SECRETS, **SETTINGS}
    env = job_env(["WANDB_API_KEY", "AWS_SESSION_TOKEN"], environ)
    assert env == {**SETTINGS, "WANDB_API_KEY": "wandb-secret",
                   "AWS_SESSION_TOKEN": "aws-session"}
    with pytest.raises(InputError, match=r"^--forward-env: HF_TOKEN is not set"):
        job_env(["WANDB_API_KEY", "HF_TOKEN"], environ)


class RecordingClient:
    """Ray's JobSubmissionClient, as far as `submit_job` uses it."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs

    def submit_job(self, **job: Any) -> str:
        self.jobs.append(job)
        return job["submission_id"]


@pytest.fixture
def ray_jobs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []

    def client(address: str) -> RecordingClient:
        assert address == ADDRESS
        return RecordingClient(jobs)

    monkeypatch.setattr(submit_module, "job_client", client)
    monkeypatch.setattr(submit_module, "check_cluster", lambda config, address: None)
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SECRETS, **SETTINGS}.items():
        monkeypatch.setenv(name, value)
    return jobs


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config(f"file://{tmp_path}/store", run="job")))
    return path


def test_submit_sends_no_secret_unless_forwarded_with_a_warning(tmp_path: Path,
                                                                ray_jobs: list) -> None:
    config = config_file(tmp_path)
    plain = runner.invoke(app, ["submit", str(config), "--address", ADDRESS])
    assert plain.exit_code == 0, plain.output
    env = ray_jobs[-1]["runtime_env"]["env_vars"]
    assert env == SETTINGS and not set(SECRETS) & set(env)
    assert "warning" not in plain.stderr
    assert f"islands status file://{tmp_path}/store/job --watch --address {ADDRESS}" \
        in one_line(plain.stdout)

    forwarded = runner.invoke(app, ["submit", str(config), "--address", ADDRESS,
                                    "--forward-env", "WANDB_API_KEY"])
    assert forwarded.exit_code == 0, forwarded.output
    env = ray_jobs[-1]["runtime_env"]["env_vars"]
    assert env == {**SETTINGS, "WANDB_API_KEY": "wandb-secret"}
    warning = one_line(forwarded.stderr)
    assert warning.startswith("warning: WANDB_API_KEY will be in the Ray job's runtime_env")
    assert "Ray dashboard" in warning and "`ray job list`" in warning
    record = json.loads((tmp_path / "store" / "job" / "submission.json").read_text())
    assert record["kind"] == "ray-job" and "wandb-secret" not in json.dumps(record)


def test_resume_as_a_job_forwards_only_what_is_named(tmp_path: Path, ray_jobs: list) -> None:
    root = tmp_path / "store" / "job"
    root.mkdir(parents=True)
    config_file(tmp_path).rename(root / "config.yaml")
    run = f"file://{root}"
    Manifest.open(RunLayout(run), "job", clusters=2)
    resumed = runner.invoke(app, ["resume", run, "--address", ADDRESS, "--forward-env",
                                  "AWS_ACCESS_KEY_ID", "--forward-env",
                                  "AWS_SECRET_ACCESS_KEY"])
    assert resumed.exit_code == 0, resumed.output
    assert ray_jobs[-1]["entrypoint"].endswith(f"resume {run} --address auto")
    assert ray_jobs[-1]["runtime_env"]["env_vars"] == {
        **SETTINGS, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY will be in" in one_line(resumed.stderr)


@pytest.mark.parametrize("args, expected", [
    (["--address", ADDRESS, "--forward-env", "ISLANDS_NOT_SET"],
     "--forward-env: ISLANDS_NOT_SET is not set in this environment"),
    (["--forward-env", "WANDB_API_KEY"], "--forward-env: only a Ray job")])
def test_forward_env_mistakes_exit_2_before_anything_is_sent(tmp_path: Path, ray_jobs: list,
                                                             args: list[str],
                                                             expected: str) -> None:
    result = runner.invoke(app, ["submit", str(config_file(tmp_path)), *args])
    assert result.exit_code == 2, result.output
    assert expected in one_line(result.stderr) and "Traceback" not in result.output
    assert "warning" not in result.stderr
    assert not ray_jobs and not (tmp_path / "store").exists()
