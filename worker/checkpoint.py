"""Checkpoints as safetensors + JSON: weights, optimizer, RNG states and data position.

A checkpoint folder is complete only when its `meta.json` exists and every file it lists
has the recorded sha256; `meta.json` is written last, so a crash mid-write leaves a folder
that readers skip. Nothing here is unpickled.

Saving is split in two so training need not wait on storage: `snapshot` copies every state to
CPU tensors and bytes between two steps (cheap), `write_checkpoint` serializes and stores them,
and `CheckpointWriter` runs that in a background thread, one checkpoint at a time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from runstore import storage
from runstore.errors import InputError
from runstore.paths import check_path


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    cursor: int = 0  # position inside the epoch's permutation
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that training can no longer change."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = cpu_copy(value)
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       layout: str) -> None:
    described = json.loads(layout)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in described["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": described["param_groups"]})


def rng_snapshot(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch_global": torch.get_rng_state(), "torch_train": generator.get_state()}
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(),
                            "pos": int(numpy_state["state"]["pos"])}
    return tensors, {"python": [py_version, list(py_state), py_gauss], "numpy": numpy_state}


def rng_restore(generator: torch.Generator, tensors: dict[str, torch.Tensor],
                states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_global"])
    generator.set_state(tensors["torch_train"])
    version, py_state, gauss = states["python"]
    random.setstate((version, tuple(py_state), gauss))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)


Snapshot = dict[str, dict[str, torch.Tensor] | bytes]  # file name -> tensors, or its bytes


def snapshot(model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, state: TrainState) -> Snapshot:
    """Everything a checkpoint holds, as copies: training may go on while it is written."""
    optimizer_tensors, optimizer_layout = _optimizer_tensors(optimizer)
    rng_tensors, rng_states = rng_snapshot(generator)
    return {
        "model.safetensors": {k: cpu_copy(v) for k, v in model.state_dict().items()},
        "ema.safetensors": {k: cpu_copy(v) for k, v in ema.state_dict().items()},
        "optimizer.safetensors": optimizer_tensors,
        "optimizer.json": optimizer_layout.encode(),
        "rng.safetensors": rng_tensors,
        "state.json": json.dumps({"train": asdict(state), "rng": rng_states}).encode(),
    }


def write_checkpoint(folder: str, files: Snapshot, step: int,
                     before_commit: Callable[[], None] | None = None,
                     meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Store a snapshot: every file, then `meta.json` with their sha256s (and `meta`).
    Everything is serialized before the first file is written, so the folder stays
    incomplete briefly. `before_commit` may refuse (raise) right before `meta.json`: the
    folder then stays incomplete, and readers skip it. Returns every file's sha256,
    `meta.json` included."""
    payloads = {name: content if isinstance(content, bytes) else save_tensors(content)
                for name, content in files.items()}
    hashes = {name: storage.write_bytes(storage.join(folder, name), data)
              for name, data in payloads.items()}
    if before_commit is not None:
        before_commit()
    meta_sha = storage.write_json(storage.join(folder, "meta.json"),
                                  {**(meta or {}), "files": hashes, "step": step})
    return {**hashes, "meta.json": meta_sha}


def save_checkpoint(folder: str, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    state: TrainState) -> dict[str, str]:
    return write_checkpoint(folder, snapshot(model, ema, optimizer, generator, state), state.step)


class CheckpointWriter:
    """Stores checkpoints in one background thread so the training thread does not stall on
    serialization and storage (uploads idled GPUs). One write at a time: the caller collects
    the previous write (blocking) before submitting the next, and before it returns. A failed
    write re-raises in the training thread when collected."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: tuple[int, Future[Any]] | None = None

    def submit(self, step: int, job: Callable[[], Any]) -> None:
        if self._pending is not None:
            raise RuntimeError("collect the previous checkpoint before submitting the next")
        self._pending = (step, self._pool.submit(job))

    def collect(self, block: bool) -> tuple[int, Any] | None:
        """(step, what its job returned) of the checkpoint in flight once it is stored,
        waiting for it if `block`; None when none is in flight, or it is still being
        written and `block` is False."""
        if self._pending is None or not (block or self._pending[1].done()):
            return None
        (step, future), self._pending = self._pending, None
        return step, future.result()  # the writer's error, raised here

    def close(self) -> None:
        """Let a write in flight finish: a complete checkpoint is worth keeping even when
        training failed (its error, if any, is dropped for the one already raised)."""
        self._pool.shutdown(wait=True)


def verified_files(folder: str) -> dict[str, bytes]:
    """Read a checkpoint's files, refusing any whose sha256 differs from meta.json."""
    meta_url = storage.join(folder, "meta.json")
    try:
        meta = storage.read_json(meta_url)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(folder, "checkpoint has no readable meta.json") from None
    listed = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(listed, dict):
        raise InputError(meta_url, "expected 'files' mapping file names to sha256")
    files = {}
    for name, expected in listed.items():
        # Names are read relative to the checkpoint folder: none may lead out of it.
        url = storage.join(folder, check_path(name, f"{meta_url}: files"))
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise InputError(url, "checkpoint file is missing") from None
        if storage.sha256_bytes(data) != expected:
            raise InputError(url, f"sha256 mismatch (expected {expected[:12]}...)")
        files[name] = data
    return files


def load_checkpoint(folder: str, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> TrainState:
    files = verified_files(folder)
    model.load_state_dict(load_tensors(files["model.safetensors"]))
    ema.load_state_dict(load_tensors(files["ema.safetensors"]))
    _restore_optimizer(optimizer, load_tensors(files["optimizer.safetensors"]),
                       files["optimizer.json"].decode())
    saved = json.loads(files["state.json"])
    rng_restore(generator, load_tensors(files["rng.safetensors"]), saved["rng"])
    return TrainState(**saved["train"])


def checkpoint_steps(checkpoints: str) -> list[int]:
    steps = []
    for name in storage.listdir(checkpoints):
        if name.startswith("step-") and name[5:].isdigit():
            steps.append(int(name[5:]))
    return sorted(steps)
