"""Benchmark islands at scale: the partition stage on large image sets, the driver with
hundreds of experts, `islands status` on such a run and the resume of a finished one.

    python scripts/bench_scale.py [--partition-rows 100000,1000000] [--experts 256]
        [--islands 64] [--expert-seconds 30] [--skip-s3] [--data-dir DIR] [--json PATH]

partition   `scripts/make_dataset.py DIR --rows N` (augmented 28x28 digit PNGs as Parquet,
            kept in --data-dir between runs), then `islands partition` on it (8 clusters)
            in its own process: rows/s over that process's wall time (interpreter start
            included), and its peak RSS (ru_maxrss from wait4 of that process).
driver      the real experts controller, its manifest, lease and live view (rendered for
            a terminal, to /dev/null), with a launcher that stands in for the islands:
            every attempt "trains" for --expert-seconds of wall time, reporting a progress
            row on every poll, and ends with final weights written before the clock started.
            Islands are --islands pool entries, each with one slot more than its share of
            experts. Measured: the driver process's CPU seconds (user + system) per
            expert-hour of running attempts, storage writes per second (objects written,
            counted by an fsspec filesystem that wraps the local one, plus the
            compare-and-swap writes of the manifest and the lease), and, a third of
            --expert-seconds after the first start and right after the driver's check of
            the islands (the worst moment), islands taken away (fullest first) until
            --lost-experts experts are on them: the time until the driver has cancelled
            them all, and until all have started again elsewhere. Baseline: 4 experts on 2
            islands.
status      `islands status RUN` on the finished driver run, as a whole process, median of
            --status-runs; against the same at 4 experts.
resume      `islands resume RUN` of the finished run (all stages done: partition and
            router/eval artifacts are stand-in files of the real layout, recorded as a stage
            records them): median of --resume-runs, on local disk and on s3:// (moto's
            server on 127.0.0.1, started here; the run is driven there as above, with 1 s
            attempts, so its stamps are the store's).

Every figure is printed with its target and MET / NOT MET; JSON of the same (--json PATH).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.control.controller import ExpertsController  # noqa: E402
from orchestrator.control.failure_policy import FailurePolicy  # noqa: E402
from orchestrator.control.launcher import Ended  # noqa: E402
from orchestrator.modalities import modality_of  # noqa: E402
from orchestrator.state.config import IslandSpec, RunConfig, parse_config  # noqa: E402
from orchestrator.state.lease import RunLease  # noqa: E402
from orchestrator.state.manifest import Manifest  # noqa: E402
from orchestrator.state.run_config import freeze_config  # noqa: E402
from runstore import cas, storage  # noqa: E402
from runstore.layout import RunLayout  # noqa: E402
from worker.train import ExpertSpec  # noqa: E402

GIB = 1 << 30
BUCKET = "islands-bench"
# Targets.
PARTITION_RSS_GIB = 2.0
PARTITION_RSS_RATIO = 1.2
CORE_SHARE_PER_64 = 0.01  # driver CPU: 1% of one core per 64 running experts
STATUS_SECONDS = 1.0
RESUME_SECONDS = 10.0
LOST_MOVE_SECONDS = 5.0  # detected within the 2 s island check, restarted on its next poll
WRITES_PER_SECOND = 1.0  # the manifest at most every 2 s, the lease every third of its term


def python() -> list[str]:
    return [sys.executable]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_measured(command: list[str], log: Path) -> tuple[float, int, int]:
    """Run `command` to its end: (wall seconds, peak RSS bytes of it and whatever it waited
    for, exit status)."""
    started = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env=child_env(), cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss * 1024, process.returncode


def checked(command: list[str], log: Path) -> tuple[float, int]:
    wall, rss, code = run_measured(command, log)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}:\n{log.read_text()[-3000:]}")
    return wall, rss


def base_config(storage_url: str, run: str, **sections: Any) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "configs" / "tiny-digits.yaml").read_text())
    raw.update(storage=storage_url, run=run)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


# ---------------------------------------------------------------- partition

def dataset(data_dir: Path, rows: int) -> Path:
    """The augmented digits of `rows` rows, written once into `data_dir`."""
    folder = data_dir / f"rows-{rows}"
    done = data_dir / f"rows-{rows}.done"
    if not done.exists():
        if folder.exists():
            for part in folder.iterdir():  # an interrupted earlier write
                part.unlink()
        checked([*python(), str(REPO / "scripts" / "make_dataset.py"), str(folder),
                 "--rows", str(rows)], data_dir / f"rows-{rows}.log")
        done.touch()
    return folder


def bench_partition(rows: int, data_dir: Path, work: Path) -> dict[str, Any]:
    source = dataset(data_dir, rows)
    config = work / f"partition-{rows}.yaml"
    config.write_text(yaml.safe_dump(base_config(
        f"file://{work}/store", f"partition-{rows}", data={"source": str(source)},
        partition={"clusters": 8})))
    wall, rss = checked([*python(), "-m", "orchestrator.cli.main", "partition", str(config)],
                        work / f"partition-{rows}.log")
    return {"rows": rows, "wall_s": wall, "rows_per_s": rows / wall, "peak_rss_bytes": rss}


# ---------------------------------------------------------------- driver

class CountingFileSystem(LocalFileSystem):
    """The local filesystem as `writecount://`, counting the objects written through it."""
    protocol = ("writecount",)
    root_marker = "/"
    writes: ClassVar[list[str]] = []

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("writecount://"):
            path = path[len("writecount://"):]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax"):
            CountingFileSystem.writes.append(path)
        return super()._open(path, mode, *args, **kwargs)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        CountingFileSystem.writes.append(path)
        super().pipe_file(path, value, *args, **kwargs)


@contextlib.contextmanager
def counted_writes() -> Iterator[list[str]]:
    """Every object written from now on: fsspec writes through writecount://, and the
    compare-and-swap writes (manifest, lease), which go to the local disk through os."""
    CountingFileSystem.writes.clear()
    original = cas._write

    def counting(url: str, data: bytes, expected: str | None) -> str:
        CountingFileSystem.writes.append(url)
        return original(url, data, expected)

    cas._write = counting
    try:
        yield CountingFileSystem.writes
    finally:
        cas._write = original


@dataclass(eq=False)
class StandInAttempt:
    expert: int
    island: str
    attempt: int
    steps: int
    started: float
    cancelled: bool = False


@dataclass
class StandInLauncher:
    """Attempts that run for `seconds` of wall time and end with artifacts written before.
    Once `lose_after` seconds have passed since the first start, islands leave (the
    attempts on them hang until cancelled, as on a cut-off node) until at least
    `lost_experts` experts are on islands that left: right after the driver has asked
    which islands are present, the worst moment, a whole check interval before it asks
    again (or at once when it has not asked yet)."""
    seconds: float
    artifacts: dict[int, dict[str, str]]
    lost_experts: int = 0
    lose_after: float = 0.0
    live: list[StandInAttempt] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    first_start: float | None = None
    lost_at: float | None = None
    moved: dict[int, float | None] = field(default_factory=dict)  # expert: restarted at
    cancelled_at: dict[int, float] = field(default_factory=dict)
    expert_seconds: float = 0.0
    attempts: int = 0
    asked: bool = False  # the driver checked the islands since the last poll
    checks: int = 0  # how often it has

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def island_speeds(self, config: RunConfig, layout: RunLayout,
                      probe: Callable[[str], ExpertSpec]) -> dict[str, float]:
        return {spec.name: float(spec.speed) for spec in config.islands.specs()}

    def present_islands(self, islands: list[IslandSpec]) -> set[str]:
        self.asked = True
        self.checks += 1
        return {spec.name for spec in islands} - self.gone

    def carried_over(self, experts: list[int]) -> dict[int, str]:
        return {}

    def start(self, spec: ExpertSpec, island: IslandSpec) -> StandInAttempt:
        now = time.monotonic()
        self.first_start = self.first_start or now
        if spec.expert in self.moved:
            self.moved[spec.expert] = now
        attempt = StandInAttempt(spec.expert, island.name, spec.attempt, spec.steps, now)
        self.live.append(attempt)
        self.attempts += 1
        return attempt

    def poll(self, timeout: float) -> list[Ended]:
        time.sleep(timeout)  # where Ray's wait blocks
        now = time.monotonic()
        if self.lost_experts and self.lost_at is None and self.first_start is not None \
                and now - self.first_start >= self.lose_after \
                and (self.asked or not self.checks):
            self.lose(now)
        self.asked = False
        ended = []
        for attempt in list(self.live):
            if attempt.cancelled:
                ended.append(Ended(attempt, error=RuntimeError(
                    "TaskCancelledError: the task was cancelled")))
            elif attempt.island in self.gone:
                continue
            elif now - attempt.started >= self.seconds:
                ended.append(Ended(attempt, result={
                    "resumed_from": 0, "steps": attempt.steps,
                    "artifacts": self.artifacts[attempt.expert],
                    "samples_seen": attempt.steps * 16, "train_flops": 1.0e9,
                    "final_loss": 0.25}))
            else:
                continue
            self.live.remove(attempt)
            self.expert_seconds += now - attempt.started
        return ended

    def lose(self, now: float) -> None:
        by_island: dict[str, list[int]] = {}
        for attempt in self.live:
            by_island.setdefault(attempt.island, []).append(attempt.expert)
        for island in sorted(by_island, key=lambda name: (-len(by_island[name]), name)):
            if len(self.moved) >= self.lost_experts:
                break
            self.gone.add(island)
            self.moved.update({expert: None for expert in by_island[island]})
        self.lost_at = now

    def cancel(self, attempt: StandInAttempt) -> None:
        attempt.cancelled = True
        self.cancelled_at.setdefault(attempt.expert, time.monotonic())

    def progress_rows(self) -> dict[int, dict[str, Any]]:
        now = time.monotonic()
        return {attempt.expert: {
            "attempt": attempt.attempt, "resumed_from": 0, "host": "bench",
            "step": min(attempt.steps, int(attempt.steps * (now - attempt.started)
                                           / self.seconds)),
            "loss": 0.5, "samples_per_s": 100.0, "micro_batch": 16, "accumulation": 1,
            "world": 1} for attempt in self.live if not attempt.cancelled}


def write_stand_ins(root: str, paths: dict[str, int]) -> dict[str, str]:
    """Files of the given sizes under the run: {path in the run: sha256}."""
    return {path: storage.write_bytes(storage.join(root, path),
                                      os.urandom(size)) for path, size in paths.items()}


def partition_files(clusters: int) -> dict[str, int]:
    files = {"partition/stats.json": 2048, "partition/centroids.safetensors": 8192,
             "partition/features.safetensors": 16384}
    for k in range(clusters):
        files[f"partition/shards/cluster={k}/part-0.parquet"] = 32768
        files[f"partition/heldout/cluster={k}/part-0.parquet"] = 4096
    return files


def expert_files(clusters: int) -> dict[int, dict[str, int]]:
    return {k: {f"experts/expert-{k}/final/model.safetensors": 65536,
                f"experts/expert-{k}/final/meta.json": 512} for k in range(clusters)}


def run_config(storage_url: str, run: str, experts: int, islands: int) -> RunConfig:
    slots = math.ceil(experts / islands) + 1  # room for the experts of a lost island
    return parse_config(base_config(
        storage_url, run, partition={"clusters": experts},
        islands={"pool": [{"name": f"island-{i:02d}", "speed": 1.0, "slots": slots}
                          for i in range(islands)]}))


def drive_run(storage_url: str, root: str, run: str, experts: int, islands: int,
              seconds: float, lost_experts: int = 0, count: bool = False) -> dict[str, Any]:
    """Drive a run of `experts` experts to its end through the real controller under a
    stand-in launcher (see the module's doc), its other stages finished with stand-in
    files. `root`: the run directory as the driver addresses it (writecount:// to count)."""
    from rich.console import Console

    config = run_config(storage_url, run, experts, islands)
    layout = RunLayout(root)
    freeze_config(config, layout)
    sizes = [1000] * experts
    partition = write_stand_ins(root, partition_files(experts))
    artifacts = {k: write_stand_ins(root, files) for k, files in expert_files(experts).items()}
    router = write_stand_ins(root, {"router/model.safetensors": 32768, "router/meta.json": 512})
    evaluation = write_stand_ins(root, {"eval/report.json": 4096, "eval/report.png": 65536,
                                        **{f"eval/samples-{s}.png": 32768
                                           for s in ("top1", "topk", "full")}})
    launcher = StandInLauncher(seconds, artifacts, lost_experts, lose_after=seconds / 3)
    recipe = modality_of(config).expert_recipe(config, {"image_shape": [28, 28, 1]})
    result: dict[str, Any] = {"experts": experts, "islands": islands,
                              "slots_per_island": config.islands.specs()[0].slots}
    with open(os.devnull, "w") as sink, \
            RunLease(layout, config.fault_tolerance.lease_seconds) as lease:
        console = Console(file=sink, force_terminal=True, width=120)  # a terminal's redraws
        manifest = Manifest.open(layout, run, experts, lease=lease)
        manifest.finish_stage("partition", partition, stats={"sizes": sizes})
        manifest.finish_stage("seed", {}, skipped="no Branch-Train-Merge seed model")
        manifest.start_stage("experts")
        controller = ExpertsController(config, manifest, list(range(experts)), recipe,
                                       launcher, FailurePolicy(3))
        with counted_writes() if count else contextlib.nullcontext([]) as writes:
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            started = time.monotonic()
            controller.run(console)
            wall = time.monotonic() - started
            used = resource.getrusage(resource.RUSAGE_SELF)
            written = list(writes)
        manifest.finish_stage("experts", {path: entry for k in range(experts)
                                          for path, entry in manifest.expert(k)
                                          ["artifacts"].items()})
        manifest.finish_stage("router", router)
        manifest.finish_stage("eval", evaluation)
    cpu_s = (used.ru_utime - cpu.ru_utime) + (used.ru_stime - cpu.ru_stime)
    expert_hours = launcher.expert_seconds / 3600
    running = launcher.expert_seconds / wall  # experts running on average
    result.update(wall_s=wall, cpu_s=cpu_s, expert_hours=expert_hours,
                  mean_running_experts=running, attempts=launcher.attempts,
                  cpu_s_per_expert_hour=cpu_s / expert_hours,
                  core_share_per_64_running=(cpu_s / wall) / (running / 64),
                  manifest_bytes=len(storage.read_bytes(layout.manifest)))
    if count:
        result.update(writes=len(written), writes_per_s=len(written) / wall,
                      manifest_writes=sum(1 for w in written if w.endswith("manifest.json")),
                      lease_writes=sum(1 for w in written if w.endswith("lease.json")))
    if lost_experts:
        assert launcher.lost_at is not None and None not in launcher.moved.values(), \
            "the experts of the lost islands did not all start again"
        restarted = [at for at in launcher.moved.values() if at is not None]
        result.update(lost_islands=len(launcher.gone), moved_experts=len(launcher.moved),
                      lost_detect_s=max(launcher.cancelled_at[k] for k in launcher.moved)
                      - launcher.lost_at,
                      lost_move_s=max(restarted) - launcher.lost_at)
    return result


# ---------------------------------------------------------------- CLI timings

def cli_wall(args: list[str], runs: int, log: Path) -> dict[str, Any]:
    walls = [checked([*python(), "-m", "orchestrator.cli.main", *args], log)[0]
             for _ in range(runs)]
    return {"median_s": statistics.median(walls), "runs_s": walls}


@contextlib.contextmanager
def moto_server(work: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one bucket; this process and its children reach
    it through AWS_CONFIG_FILE. Yields the bucket's URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    config = work / "aws-config.ini"
    config.write_text(f"[default]\naws_access_key_id = testing\naws_secret_access_key = "
                      f"testing\nregion = us-east-1\nendpoint_url = {endpoint}\n")
    saved = os.environ.get("AWS_CONFIG_FILE")
    os.environ["AWS_CONFIG_FILE"] = str(config)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        if saved is None:
            os.environ.pop("AWS_CONFIG_FILE", None)
        else:
            os.environ["AWS_CONFIG_FILE"] = saved


# ---------------------------------------------------------------- report

def figure(figures: list[dict[str, Any]], name: str, value: float, unit: str,
           target: str, met: bool | None, note: str = "") -> None:
    figures.append({"name": name, "value": value, "unit": unit, "target": target,
                    "met": met, "note": note})


def verdict(met: bool | None) -> str:
    return "-" if met is None else "MET" if met else "NOT MET"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition-rows", default="100000,1000000",
                        help="comma-separated dataset sizes (e.g. 1000000,10000000); "
                        "empty to skip")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--islands", type=int, default=64)
    parser.add_argument("--expert-seconds", type=float, default=30.0,
                        help="wall seconds each stand-in attempt runs")
    parser.add_argument("--lost-experts", type=int, default=16,
                        help="islands leave until this many experts are on them")
    parser.add_argument("--status-runs", type=int, default=5)
    parser.add_argument("--resume-runs", type=int, default=3)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where datasets are written and reused (default: temporary)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [int(part) for part in args.partition_rows.split(",") if part.strip()]
    fsspec.register_implementation("writecount", CountingFileSystem, clobber=True)
    figures: list[dict[str, Any]] = []
    phases: dict[str, float] = {}  # wall seconds each part of the benchmark took
    results: dict[str, Any] = {"figures": figures, "phase_s": phases,
                               "load_average_start": os.getloadavg()[0]}
    clock = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = now - clock[0]
        clock[0] = now

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as temp:
        work = Path(temp)
        data_dir = args.data_dir or work / "data"
        data_dir.mkdir(parents=True, exist_ok=True)

        # partition
        parts = results["partition"] = [bench_partition(n, data_dir, work) for n in rows]
        for part in parts:
            rss = part["peak_rss_bytes"] / GIB
            figure(figures, f"partition {part['rows']:,} rows: rows/s", part["rows_per_s"],
                   "rows/s", "-", None)
            figure(figures, f"partition {part['rows']:,} rows: peak RSS", rss, "GiB",
                   f"<= {PARTITION_RSS_GIB:g} GiB", rss <= PARTITION_RSS_GIB)
        if len(parts) >= 2:
            ratio = parts[-1]["peak_rss_bytes"] / parts[0]["peak_rss_bytes"]
            figure(figures, f"partition peak RSS {parts[-1]['rows']:,} / {parts[0]['rows']:,}",
                   ratio, "x", f"<= {PARTITION_RSS_RATIO:g}x", ratio <= PARTITION_RSS_RATIO)

        phase("partition")

        # driver: the baseline, then the run at scale
        local = f"file://{work}/runs"
        small = drive_run(local, f"writecount://{work}/runs/scale-4", "scale-4", 4, 2,
                          args.expert_seconds, count=True)
        big = drive_run(local, f"writecount://{work}/runs/scale-{args.experts}",
                        f"scale-{args.experts}", args.experts, args.islands,
                        args.expert_seconds, lost_experts=args.lost_experts, count=True)
        results["driver"] = {"baseline": small, "scale": big}
        limit = CORE_SHARE_PER_64 * 3600 / 64
        name = f"{args.experts} experts / {args.islands} islands"
        figure(figures, f"driver CPU per expert-hour, {name}", big["cpu_s_per_expert_hour"],
               "s", f"<= {limit:.3f} s (1% of a core per 64 running)",
               big["cpu_s_per_expert_hour"] <= limit)
        figure(figures, "driver CPU per expert-hour, 4 experts", small["cpu_s_per_expert_hour"],
               "s", "-", None)
        figure(figures, f"driver core share per 64 running experts, {name}",
               100 * big["core_share_per_64_running"], "%", "<= 1%",
               big["core_share_per_64_running"] <= CORE_SHARE_PER_64)
        figure(figures, f"storage writes/s, {name}", big["writes_per_s"], "/s",
               f"<= {WRITES_PER_SECOND:g}/s", big["writes_per_s"] <= WRITES_PER_SECOND)
        figure(figures, "storage writes/s, 4 experts", small["writes_per_s"], "/s", "-", None)
        figure(figures, f"storage writes/s {args.experts} / 4 experts",
               big["writes_per_s"] / small["writes_per_s"], "x", "-", None)
        figure(figures, f"manifest size, {name}", big["manifest_bytes"] / 1024, "KiB", "-",
               None)
        if args.lost_experts:
            what = f"{big['lost_islands']} islands lost, {big['moved_experts']} experts"
            figure(figures, f"lost island detected ({what})", big["lost_detect_s"], "s",
                   "-", None)
            figure(figures, f"lost island's experts all restarted ({what})",
                   big["lost_move_s"], "s", f"<= {LOST_MOVE_SECONDS:g} s",
                   big["lost_move_s"] <= LOST_MOVE_SECONDS)

        phase("driver")

        # islands status
        big_run = str(work / "runs" / f"scale-{args.experts}")
        small_run = str(work / "runs" / "scale-4")
        status_big = cli_wall(["status", big_run], args.status_runs, work / "status.log")
        status_small = cli_wall(["status", small_run], args.status_runs, work / "status.log")
        results["status"] = {"scale": status_big, "baseline": status_small}
        figure(figures, f"islands status, {args.experts} experts", status_big["median_s"],
               "s", f"< {STATUS_SECONDS:g} s", status_big["median_s"] < STATUS_SECONDS)
        figure(figures, f"islands status {args.experts} / 4 experts",
               status_big["median_s"] / status_small["median_s"], "x", "-", None)

        phase("status")

        # islands resume of the finished run
        resume_local = cli_wall(["resume", big_run], args.resume_runs, work / "resume.log")
        results["resume"] = {"local": resume_local}
        figure(figures, f"islands resume of a finished {args.experts}-expert run, local",
               resume_local["median_s"], "s", f"< {RESUME_SECONDS:g} s",
               resume_local["median_s"] < RESUME_SECONDS)
        if not args.skip_s3:
            with moto_server(work) as bucket:
                s3_root = f"{bucket}/runs/scale-{args.experts}"
                built = time.monotonic()
                drive_run(f"{bucket}/runs", s3_root, f"scale-{args.experts}", args.experts,
                          args.islands, 1.0)
                results["resume"]["s3_build_s"] = time.monotonic() - built
                resume_s3 = cli_wall(["resume", s3_root], args.resume_runs,
                                     work / "resume-s3.log")
                status_s3 = cli_wall(["status", s3_root], args.status_runs,
                                     work / "status-s3.log")
            results["resume"]["s3"] = resume_s3
            results["status"]["s3"] = status_s3
            figure(figures, f"islands resume of a finished {args.experts}-expert run, s3",
                   resume_s3["median_s"], "s", f"< {RESUME_SECONDS:g} s",
                   resume_s3["median_s"] < RESUME_SECONDS)
            figure(figures, "islands resume s3 / local",
                   resume_s3["median_s"] / resume_local["median_s"], "x", "-", None)
            figure(figures, f"islands status, {args.experts} experts, s3",
                   status_s3["median_s"], "s", f"< {STATUS_SECONDS:g} s",
                   status_s3["median_s"] < STATUS_SECONDS)

        phase("resume")
    results["load_average_end"] = os.getloadavg()[0]
    print_table(figures)
    print(f"load average (1 min): {results['load_average_start']:.2f} at the start, "
          f"{results['load_average_end']:.2f} at the end; parts took "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items()))
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")


def print_table(figures: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="islands at scale")
    for column in ("figure", "value", "target", ""):
        table.add_column(column, justify="right" if column == "value" else "left")
    for row in figures:
        value = row["value"]
        shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" \
            if abs(value) < 10 else f"{value:.1f}"
        table.add_row(row["name"], f"{shown} {row['unit']}", row["target"],
                      verdict(row["met"]))
    Console(width=150, file=sys.stdout).print(table)


if __name__ == "__main__":
    main()
