"""Chaos harness: run a config while killing expert workers (SIGKILL) and the driver at
random moments, then check that the run finished, that no expert lost more than one
checkpoint interval per kill, and that the final weights are bit-identical to an
uninterrupted run of the same config.

    python scripts/chaos.py configs/quickstart-image.yaml --worker-kills 10 --driver-kills 2

With `--mesh N` the run is decentralized instead (`scripts/chaos_mesh.py`): a coordinator
and N island agents over the mesh on 127.0.0.1; islands are SIGKILLed (and restarted) or
SIGSTOPped (and thawed), the coordinator is SIGKILLed and resumed, and the final weights are
compared with an uninterrupted run of the same config on the embedded Ray:

    python scripts/chaos.py configs/tiny-digits.yaml --mesh 3 --island-kills 6 \
        --coordinator-kills 1 --steps 600 --checkpoint-every 25

Prints a table and writes JSON (--out). Everything it starts it stops; it only kills
processes that descend from the drivers (and agents) it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from chaos_mesh import MeshChaos, detection_seconds
from rich.console import Console
from rich.table import Table

WORKER_TITLE = "ray::expert-"  # Ray titles a task's process after the task's name


def write_config(source: Path, folder: Path, run: str, args: argparse.Namespace) -> Path:
    raw = yaml.safe_load(source.read_text())
    raw["run"] = run
    raw["storage"] = f"file://{folder}"
    raw.setdefault("tracking", {})["wandb"] = "disabled"
    faults = raw.setdefault("fault_tolerance", {})
    # every kill may hit the same expert
    faults["max_retries"] = max(args.worker_kills, args.island_kills) + 2
    faults["lease_seconds"] = args.lease_seconds
    experts = raw.setdefault("experts", {})
    if args.steps:
        experts["steps"] = args.steps
    if args.checkpoint_every:
        experts["checkpoint_every"] = args.checkpoint_every
    experts["log_every"] = min(experts.get("log_every", 25), 10)
    path = folder / f"{run}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(command: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    # A session of its own, so the driver and the Ray it starts can be killed together.
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def expert_workers(driver: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for proc in tree(driver):
        try:
            if any(WORKER_TITLE in part for part in proc.cmdline()[:1]):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_tree(driver: subprocess.Popen) -> None:
    for proc in tree(driver):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    driver.wait()


def final_weights(run_dir: Path) -> dict[str, bytes]:
    files = sorted(run_dir.glob("experts/*/final/model.safetensors"))
    files += sorted(run_dir.glob("router/model.safetensors"))
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in files}


def chaos_run(config: Path, run_dir: Path, args: argparse.Namespace,
              rng: random.Random, log: Path, console: Console) -> dict[str, Any]:
    islands = [sys.executable, "-m", "orchestrator.cli.main"]
    driver = start([*islands, "run", str(config)], log)
    worker_kills, driver_kills, events = 0, 0, []
    # Spread driver kills over the worker kills so both happen mid-training.
    driver_after = sorted(rng.sample(range(1, args.worker_kills + 1), args.driver_kills)) \
        if args.driver_kills else []
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        time.sleep(rng.uniform(args.min_wait, args.max_wait))
        if driver.poll() is not None:
            if driver.returncode == 0:
                break
            raise SystemExit(f"driver exited with {driver.returncode}; see {log}")
        if driver_kills < len(driver_after) and worker_kills >= driver_after[driver_kills]:
            kill_tree(driver)
            driver_kills += 1
            events.append({"t": time.time(), "kind": "driver"})
            console.print(f"killed the driver ({driver_kills}/{args.driver_kills})")
            time.sleep(args.lease_seconds + 1)  # the dead driver's lease expires
            driver = start([*islands, "resume", str(run_dir), "--force"], log)
            continue
        if worker_kills < args.worker_kills:
            workers = expert_workers(driver)
            if not workers:
                continue
            victim = rng.choice(workers)
            name = victim.cmdline()[0]
            victim.send_signal(signal.SIGKILL)
            worker_kills += 1
            events.append({"t": time.time(), "kind": "worker", "process": name})
            console.print(f"killed {name} ({worker_kills}/{args.worker_kills})")
    else:
        kill_tree(driver)
        raise SystemExit(f"chaos run did not finish in {args.timeout}s; see {log}")
    if driver.poll() is None:
        driver.wait(timeout=max(1, deadline - time.time()))
    return {"worker_kills": worker_kills, "driver_kills": driver_kills, "events": events,
            "exit_code": driver.returncode}


def steps_lost(attempts: list[dict[str, Any]], index: int) -> int:
    """Steps attempt `index` had reported that the next attempt to report had to redo.

    An attempt killed before its first report had trained nothing new: it lost 0. The
    last report trails the kill by up to experts.log_every steps, so this is a floor."""
    reached = attempts[index].get("reported_step")
    if reached is None or attempts[index + 1].get("carried_over"):
        return 0   # a carried-over attempt went on training: nothing was redone
    for later in attempts[index + 1 :]:
        if later.get("resumed_from") is not None:
            return max(0, reached - later["resumed_from"])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--worker-kills", type=int, default=10)
    parser.add_argument("--driver-kills", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="Override experts.steps.")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--min-wait", type=float, default=4.0)
    parser.add_argument("--max-wait", type=float, default=15.0)
    parser.add_argument("--lease-seconds", type=float, default=4.0)
    parser.add_argument("--mesh", type=int, default=0, metavar="N",
                        help="Decentralized: a coordinator and N island agents over the mesh.")
    parser.add_argument("--island-kills", type=int, default=6,
                        help="With --mesh: island SIGKILLs and SIGSTOPs, about half each.")
    parser.add_argument("--coordinator-kills", type=int, default=1,
                        help="With --mesh: coordinator SIGKILLs, each followed by a resume.")
    parser.add_argument("--mesh-lease-seconds", type=float, default=5.0,
                        help="With --mesh: mesh.lease_seconds, after which a hung island "
                             "loses its leases.")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("chaos.json"))
    args = parser.parse_args()
    if args.mesh and args.coordinator_kills > args.island_kills:
        parser.error("--coordinator-kills cannot exceed --island-kills")
    if not args.mesh and args.driver_kills > args.worker_kills:
        parser.error("--driver-kills cannot exceed --worker-kills")

    console = Console()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="islands-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "drivers.log"
    rng = random.Random(args.seed)

    reference = write_config(args.config, folder, "reference", args)
    console.print(f"uninterrupted reference run ({folder / 'reference'})")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "run", str(reference)],
                   check=True, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    reference_seconds = time.perf_counter() - started

    config = write_config(args.config, folder, "chaos", args)
    run_dir = folder / "chaos"
    console.print(f"chaos run ({run_dir})")
    started = time.perf_counter()
    if args.mesh:
        outcome = MeshChaos(config, run_dir, folder, args, rng, console).run()
    else:
        outcome = chaos_run(config, run_dir, args, rng, log, console)
    chaos_seconds = time.perf_counter() - started

    manifest = json.loads((run_dir / "manifest.json").read_text())
    if args.mesh:
        outcome["detections"] = detection_seconds(outcome.pop("events"), manifest)
    interval = yaml.safe_load(config.read_text())["experts"].get("checkpoint_every", 500)
    experts = []
    for key, entry in sorted(manifest["experts"].items(), key=lambda kv: int(kv[0])):
        attempts = entry["attempts"]
        lost = [steps_lost(attempts, index) for index in range(len(attempts) - 1)]
        experts.append({"expert": int(key), "state": entry["state"], "attempts": len(attempts),
                        "reasons": [a.get("reason", "") for a in attempts[:-1]],
                        "steps_lost": lost})
    ours, theirs = final_weights(run_dir), final_weights(folder / "reference")
    identical = {name: ours.get(name) == data for name, data in theirs.items()}
    finished = all(stage["state"] == "done" for stage in manifest["stages"].values())
    worst = max((max(e["steps_lost"], default=0) for e in experts), default=0)

    kills = (f"{outcome['island_kills']} island kills, {outcome['coordinator_kills']} "
             "coordinator kills" if args.mesh else
             f"{outcome['worker_kills']} worker kills, {outcome['driver_kills']} driver kills")
    table = Table(title=f"chaos: {args.config} ({kills})")
    for column in ("expert", "attempts", "steps lost per ended attempt", "bit-identical"):
        table.add_column(column, justify="right")
    for row in experts:
        name = f"experts/expert-{row['expert']}/final/model.safetensors"
        table.add_row(str(row["expert"]), str(row["attempts"]),
                      ", ".join(map(str, row["steps_lost"])) or "-",
                      "yes" if identical.get(name) else "NO")
    table.caption = (f"run finished: {'yes' if finished else 'NO'}; router bit-identical: "
                     f"{'yes' if identical.get('router/model.safetensors', True) else 'NO'}; "
                     f"worst loss {worst} steps vs checkpoint interval {interval}; "
                     f"wall {chaos_seconds:.0f}s vs {reference_seconds:.0f}s uninterrupted")
    console.print(table)
    if args.mesh:
        detected = Table(title="island kills: time until the coordinator ended the attempt")
        for column in ("island", "signal", "detected after (s)"):
            detected.add_column(column, justify="right")
        for row in outcome["detections"]:
            seconds = row["detected_after_s"]
            detected.add_row(row["island"], row["kind"].split()[-1],
                             "-" if seconds is None else f"{seconds:.2f}")
        console.print(detected)
    result = {"config": str(args.config), "folder": str(folder), **outcome,
              "finished": finished, "checkpoint_every": interval,
              "max_steps_lost": worst, "within_one_interval": worst <= interval,
              "bit_identical": identical, "all_bit_identical": all(identical.values()),
              "experts": experts, "chaos_seconds": chaos_seconds,
              "reference_seconds": reference_seconds}
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")
    # On the mesh a checkpoint counts once the coordinator holds it: an island lost while
    # its newest one is on the way loses the steps it trained meanwhile too (reported, not
    # failed on).
    if not (finished and result["all_bit_identical"]
            and (result["within_one_interval"] or args.mesh)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
