"""The floors of orchestrator/ import only downward, and no code outside the modality
modules asks which modality a run is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each floor and what it may import of ours (runstore, worker and partitioner are below all).
ROOMS = {
    "orchestrator/state": {"orchestrator.state"},
    "orchestrator/control": {"orchestrator.state", "orchestrator.control"},
    "orchestrator/mesh": {"orchestrator.state", "orchestrator.control", "orchestrator.mesh"},
    "orchestrator/ensemble": {"orchestrator.state", "orchestrator.ensemble"},
    "orchestrator/evaluate": {"orchestrator.state", "orchestrator.evaluate"},
    "orchestrator/serve": {"orchestrator.state", "orchestrator.control", "orchestrator.ensemble",
                           "orchestrator.modalities", "orchestrator.serve"},
    "orchestrator/distill": {"orchestrator.state", "orchestrator.control",
                             "orchestrator.ensemble", "orchestrator.modalities",
                             "orchestrator.distill"},
    "orchestrator/modalities": {"orchestrator.state", "orchestrator.control",
                                "orchestrator.ensemble", "orchestrator.evaluate",
                                "orchestrator.modalities"},
    "worker": set(),
    "partitioner": set(),
    "runstore": set(),
}
OURS = ("orchestrator", "worker", "partitioner", "runstore")
BELOW = {"worker": ("runstore", "worker"), "partitioner": ("runstore", "partitioner"),
         "runstore": ("runstore",)}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in OURS}


def allowed(room: str, name: str) -> bool:
    top = room.split("/")[0]
    if top in BELOW:
        return name.split(".")[0] in BELOW[top]
    if name.split(".")[0] in ("runstore", "worker", "partitioner"):
        return True
    return any(name == prefix or name.startswith(prefix + ".") for prefix in ROOMS[room])


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_imports_only_run_downward(room):
    bad = [f"{path.relative_to(REPO)} imports {name}"
           for path in sorted((REPO / room).rglob("*.py"))
           for name in sorted(imports_of(path)) if not allowed(room, name)]
    assert not bad, "\n".join(bad)


def test_no_code_outside_the_modality_modules_branches_on_a_modality_name():
    branch = re.compile(r'modality ?==|== ?"(text|image)"')
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for top in ("orchestrator", "partitioner", "worker")
             for path in sorted((REPO / top).rglob("*.py"))
             if "modalities" not in path.parts and path.name != "config.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if branch.search(line)]
    assert not found, "\n".join(found)
