"""A finished run, opened by the server's deployments from its URL."""

from __future__ import annotations

from orchestrator.state.config import RunConfig, parse_config, read_yaml
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout

NEEDED = ("experts", "router")


def open_finished(root: str) -> tuple[RunConfig, Manifest]:
    """The run's config and manifest, once its experts and router are trained."""
    layout = RunLayout(root)
    if not storage.exists(layout.config):
        raise InputError(root, "not an islands run directory (no config.yaml)")
    config = parse_config(read_yaml(storage.read_bytes(layout.config)), layout.config)
    manifest = Manifest.load(layout)
    missing = [stage for stage in NEEDED if not manifest.stage_done(stage)]
    if missing:
        raise InputError(root, f"the {' and '.join(missing)} stage"
                         f"{'s are' if len(missing) > 1 else ' is'} not done: finish the run "
                         f"first (islands resume {root})")
    return config, manifest
