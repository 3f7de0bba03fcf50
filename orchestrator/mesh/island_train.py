"""One expert's attempt on an island, in a process of its own (`island_agent.py` starts it):

    python -m orchestrator.mesh.island_train --spec SPEC.json --root RUN_ROOT [--calibrate]

SPEC.json is the worker's ExpertSpec as a JSON object (an offer's `spec`); `init_from`, when
set, is a path relative to the run. It calls the same `train_expert` as the Ray path, so the
weights are the same bit for bit. Stdout carries JSON lines only: {"progress": row} per
progress row, then {"result": ExpertResult} at the end, or {"input_error": {"where",
"problem"}} with exit code 2. Any other error: its traceback on stderr, exit code 1. Whatever
else prints (the worker's log lines) goes to stderr. With --calibrate it trains nothing: it
times a few steps of the spec's training step (`measure_throughput`, as Ray's calibration
does) and prints {"throughput": {"samples_per_s", ...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TextIO

from orchestrator.mesh.coordination import check_path
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.throughput import measure_throughput
from worker.train import ExpertSpec, train_expert


def spec_from_dict(data: Any, root: str) -> ExpertSpec:
    """The ExpertSpec a JSON object describes: lists back to tuples where the field is a
    tuple, `init_from` resolved inside the run at `root`."""
    if not isinstance(data, dict):
        raise InputError("spec", f"expected a JSON object, got {type(data).__name__}")
    known = {f.name: str(f.type) for f in fields(ExpertSpec)}
    if unknown := sorted(set(data) - set(known)):
        raise InputError("spec", f"unknown fields {unknown}")
    values = {name: tuple(value) if isinstance(value, list) and known[name].startswith("tuple")
              else value for name, value in data.items()}
    if values.get("init_from"):
        values["init_from"] = storage.join(root, check_path(str(values["init_from"]),
                                                            "spec.init_from"))
    try:
        return ExpertSpec(**values)
    except TypeError as error:  # a required field is missing
        raise InputError("spec", str(error)) from None


def _protocol_stdout() -> TextIO:
    """Our own handle on stdout for the JSON lines; fd 1 then points at stderr, so prints
    from anywhere in training (and C libraries) cannot corrupt the protocol."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.mesh.island_train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the ExpertSpec as a JSON file")
    parser.add_argument("--root", required=True, help="the island's copy of the run directory")
    parser.add_argument("--calibrate", action="store_true",
                        help="time the training step instead of training")
    args = parser.parse_args(argv)
    out = _protocol_stdout()

    def say(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        root = str(Path(args.root).absolute())
        try:
            data = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as error:
            raise InputError(args.spec, f"no readable JSON spec ({error})") from None
        spec = spec_from_dict(data, root)
        if args.calibrate:
            say({"throughput": measure_throughput(spec, RunLayout(root))})
            return 0
        result = train_expert(spec, RunLayout(root), progress=lambda row: say({"progress": row}),
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    except InputError as error:
        say({"input_error": {"where": error.where, "problem": error.problem}})
        return 2
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    say({"result": asdict(result)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
