"""Paths inside a run directory: the contract between stages (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass

from runstore.storage import join


@dataclass(frozen=True)
class RunLayout:
    root: str  # <storage>/<run>

    @property
    def config(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def manifest(self) -> str:
        return join(self.root, "manifest.json")

    @property
    def lease(self) -> str:
        """The driver holding the run, with the epoch every write of the run is fenced by."""
        return join(self.root, "lease.json")

    @property
    def cancel_request(self) -> str:
        """Written by `islands cancel`; the driver polls for it."""
        return join(self.root, "cancel.json")

    @property
    def partition(self) -> str:
        return join(self.root, "partition")

    @property
    def centroids(self) -> str:
        return join(self.partition, "centroids.safetensors")

    @property
    def features(self) -> str:
        return join(self.partition, "features.safetensors")

    @property
    def partition_stats(self) -> str:
        return join(self.partition, "stats.json")

    def shard(self, cluster: int, split: str = "train") -> str:
        folder = "shards" if split == "train" else "heldout"
        return join(self.partition, folder, f"cluster={cluster}", "part-0.parquet")

    def expert(self, expert: int) -> str:
        """Expert K's folder; expert -1 is the shared seed model of Branch-Train-Merge."""
        return join(self.root, "experts", "seed" if expert < 0 else f"expert-{expert}")

    def checkpoints(self, expert: int) -> str:
        return join(self.expert(expert), "checkpoints")

    def checkpoint(self, expert: int, step: int) -> str:
        return join(self.checkpoints(expert), f"step-{step:08d}")

    def snapshots(self, expert: int) -> str:
        """Permanent snapshots at chosen steps (`experts.snapshot_at`), never pruned."""
        return join(self.expert(expert), "snapshots")

    def snapshot(self, expert: int, step: int) -> str:
        return join(self.snapshots(expert), f"step-{step:08d}")

    def final(self, expert: int) -> str:
        return join(self.expert(expert), "final")

    def metrics(self, expert: int) -> str:
        return join(self.expert(expert), "metrics.parquet")

    def expert_log(self, expert: int) -> str:
        """The expert's log as numbered parts, one sequence per attempt
        (runstore/log_parts.py): object stores have no append."""
        return join(self.expert(expert), "log")

    def legacy_expert_log(self, expert: int) -> str:
        """The single log.txt of runs written before log parts; read, never written."""
        return join(self.expert(expert), "log.txt")

    @property
    def driver_log(self) -> str:
        """The driver's output when `islands submit` started it in the background."""
        return join(self.root, "driver.log")

    @property
    def submission(self) -> str:
        """Where and how the run was submitted: Ray job id and address, or a local pid."""
        return join(self.root, "submission.json")

    @property
    def calibration(self) -> str:
        """Measured island speeds, so a resumed run places experts the same way."""
        return join(self.root, "calibration.json")

    @property
    def router(self) -> str:
        return join(self.root, "router")

    @property
    def eval(self) -> str:
        return join(self.root, "eval")


def run_root(storage: str, run_name: str) -> str:
    return join(storage, run_name)
