"""The run's frozen config: where a run lives, and what may differ when it is resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.state.config import RunConfig, config_to_yaml, parse_config, read_yaml
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout, run_root

# Keys that change how or where a run executes, not what it computes: they may differ on
# resume (storage is where the run lives; a run directory can be moved; mesh is this peer's
# identity and roster, and runs frozen before it existed have none).
EXECUTION_ONLY = ("storage", "islands", "tracking", "fault_tolerance", "mesh")


def resolve_storage(url: str) -> str:
    """Relative local paths become absolute so Ray workers in other folders agree."""
    if "://" not in url or url.startswith("file://"):
        return "file://" + str(Path(url.removeprefix("file://")).expanduser().resolve())
    return url


def layout_for(config: RunConfig) -> RunLayout:
    return RunLayout(run_root(resolve_storage(config.storage), config.run))


def freeze_config(config: RunConfig, layout: RunLayout) -> None:
    """Write config.yaml on first start; later starts must agree on everything computed.

    Until a stage has finished nothing depends on the config, so a fixed config (after a
    bad data path, say) simply replaces it.
    """
    if not refuse_changed_config(config, layout):
        storage.write_bytes(layout.config, config_to_yaml(config).encode())


def refuse_changed_config(config: RunConfig, layout: RunLayout) -> bool:
    """True when the run's config is frozen (a stage has finished) and agrees with `config`;
    an InputError when it disagrees on anything computed; False when not frozen yet."""
    if not storage.exists(layout.config) or not _any_stage_done(layout):
        return False
    frozen = parse_config(read_yaml(storage.read_bytes(layout.config)), layout.config)
    ours, theirs = config.dump(), frozen.dump()
    changed = [change for key in ours if key not in EXECUTION_ONLY
               for change in _differences(key, theirs.get(key), ours[key])]
    if changed:
        raise InputError("config", f"run {config.run!r} already exists at {layout.root} with "
                         f"a different config ({'; '.join(changed)}); use a new run name")
    return True


def _differences(path: str, frozen: Any, ours: Any) -> list[str]:
    """`path: frozen -> ours` for every leaf that differs, by dotted path."""
    if isinstance(frozen, dict) and isinstance(ours, dict):
        return [change for key in sorted(frozen.keys() | ours.keys())
                for change in _differences(f"{path}.{key}", frozen.get(key), ours.get(key))]
    return [] if frozen == ours else [f"{path}: {frozen!r} -> {ours!r}"]


def _any_stage_done(layout: RunLayout) -> bool:
    if not storage.exists(layout.manifest):
        return False
    return any(entry["state"] == "done"
               for entry in Manifest.load(layout).data["stages"].values())


def open_run_dir(root: str, name: str | None = None) -> tuple[RunConfig, Manifest]:
    """The config and manifest of the run directory at `root` (any fsspec URL); `name` is
    how the user named it, for the error."""
    layout = RunLayout(resolve_storage(root).rstrip("/"))
    if not storage.exists(layout.config):
        raise InputError(name or root, "not an islands run directory (no config.yaml)")
    config = parse_config(read_yaml(storage.read_bytes(layout.config)), layout.config)
    return config, Manifest.load(layout)
