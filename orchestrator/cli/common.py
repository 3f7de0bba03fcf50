"""What every verb shares: the console, error handling (exit 2 on bad input), run lookup."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

# Verbs import torch, Ray and the rest only where they need them, so that `--help`,
# `validate`, `status` and `logs` answer at once (tests/test_cli_imports.py).
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest, RunCancelled
from orchestrator.state.run_config import open_run_dir
from runstore.errors import InputError, OperationalError

console = Console()
error_console = Console(stderr=True)
settings = {"debug": False}
FORWARD_ENV_HELP = ("Forward this variable from your environment to the Ray job (repeatable), "
                    "e.g. a credential the nodes lack. It is stored with the job: anyone who "
                    "can open the Ray dashboard or run `ray job list` can read it.")
# --address of status, logs and cancel: the recorded one is never contacted on its own.
ASK_ADDRESS_HELP = ("The Ray dashboard to ask about the run's Ray job, http://HEAD:8265. "
                    "Without it no dashboard is contacted, not even the one submission.json "
                    "records (a run directory may come from anyone; Ray's client sends it "
                    "your token).")

F = TypeVar("F", bound=Callable[..., Any])


def is_operational(err: BaseException) -> bool:
    """A failure of the machinery rather than the input. OSError: storage still failing
    after its retries (a missing file is an InputError where the input names it);
    RayError: Ray itself, outside any one expert's attempt."""
    if isinstance(err, (OperationalError, OSError)):
        return True
    ray_errors = sys.modules.get("ray.exceptions")  # never imported: not a Ray error
    return ray_errors is not None and isinstance(err, ray_errors.RayError)


def handles_errors(command: F) -> F:
    """Bad input: one line naming the field or file, exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except InputError as err:
            if settings["debug"]:
                raise
            error_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                                soft_wrap=True)
            raise typer.Exit(2) from None
        except RunCancelled as cancelled:
            console.print(f"cancelled; checkpoints kept: islands resume {cancelled}")
            raise typer.Exit(0) from None
        except Exception as err:
            if not is_operational(err) or settings["debug"]:
                raise
            # The machinery failed: one line, exit 1, resume continues.
            error_console.print(f"[bold red]error:[/] {escape(operational_line(err))}",
                                highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def operational_line(err: BaseException) -> str:
    """An operational error in one line: our own say what happened; another (storage that
    stayed unreachable after its retries, Ray's own errors) is named by its type and the
    first line of its message."""
    if isinstance(err, OperationalError):
        return str(err)
    first = next(iter(str(err).splitlines()), "").strip()
    return f"{type(err).__name__}: {first}".rstrip(": ")


def warn_forwarded(names: list[str]) -> None:
    """Say, on stderr, that variables forwarded to a Ray job are exposed with it."""
    if names:
        from orchestrator.control.submit import EXPOSED_WARNING

        error_console.print("[bold yellow]warning:[/] " + escape(EXPOSED_WARNING.format(
            names=", ".join(sorted(set(names))))), highlight=False, soft_wrap=True)


def open_run(run: str) -> tuple[RunConfig, Manifest]:
    """A run given as a local path or any fsspec URL of its run directory."""
    return open_run_dir(run, run)


def require_verb(config: RunConfig, verb: str, run: str) -> None:
    """A verb that does not apply to the run's modality (sampling text, say) is bad input,
    said before anything of the run is read beyond its config."""
    from orchestrator.modalities import modality_of

    modality = modality_of(config)
    if verb in modality.verbs:
        return
    if not modality.verbs:
        raise InputError(run, f"this is a {modality.name} run: `islands {verb}` does not "
                         f"apply to {modality.name} runs")
    use = " or ".join(f"`islands {each}`" for each in sorted(modality.verbs))
    raise InputError(run, f"this is a{'n' if modality.name[0] in 'aeiou' else ''} "
                     f"{modality.name} run: use {use}")


def check_top_k(strategy: str, top_k: int, experts: int) -> None:
    """topk over more experts than the run has would silently be `full`."""
    if strategy == "topk" and top_k > experts:
        raise InputError("--top-k", f"is {top_k} but the run has {experts} expert"
                         f"{'s' if experts != 1 else ''}; expected at most {experts}")


def open_for_verb(run: str, verb: str, strategy: str, top_k: int
                  ) -> tuple[RunConfig, Manifest]:
    """The run a sampling verb (`islands sample`, `islands generate`) reads: its modality
    has the verb and --top-k fits its experts. `load_model` then reads the model."""
    config, manifest = open_run(run)
    require_verb(config, verb, run)
    check_top_k(strategy, top_k, config.clusters)
    return config, manifest


MODEL_HELP = "ensemble (the experts behind the router) or distill (the `islands distill` student)."


def load_model(config: RunConfig, manifest: Manifest, model: str, run: str) -> tuple[Any, list]:
    """The model `--model` names as an Ensemble (the student: one expert, no router) and
    its experts' meta.json."""
    from orchestrator.ensemble.experts import load_student
    from orchestrator.modalities import modality_of

    spec = modality_of(config)
    if model == "ensemble":
        return spec.load_ensemble(config, manifest)
    if model != "distill":
        raise InputError("--model", f"unknown {model!r}; expected ensemble or distill")
    if spec.student_ensemble is None or not manifest.stage_done("distill"):
        raise InputError("--model", f"{run} has no distilled student: expected a finished "
                         f"`islands distill {run}` first")
    student, meta = load_student(manifest)
    return spec.student_ensemble(student), [meta]
