"""The coordinator <-> island protocol of decentralized runs, `/islands/coord/1`.

Every message is a request from an island agent to the coordinator over the mesh
(`MeshClient.request`, acknowledged, retried once by the daemon), a JSON object with an
"op", answered with a JSON object or refused with an error (`MeshError` on the island).
The coordinator never calls an island: offers and revocations ride on the heartbeat's
answer, so an island behind a NAT or a relay works the same, and a restarted coordinator
needs no island address.

    join       {"island", "capacity": {"cpus", "accelerators": {"type", "count",
               "memory_gb"} | null}}
               -> {"run", "heartbeat_seconds", "lease_seconds", "coordinator"}
    heartbeat  {"island", "tokens": [token, ...]}      the leases it still works under
               -> {"offers": [Offer, ...], "revoked": [token, ...], "calibrate"?: Offer}
               `calibrate`: time the training step of the Offer's spec (its attempt is 0,
               its token "calibrate.<island>.<random>") and answer with `speed`
    speed      {"island", "token", "result": {"samples_per_s", ...} | null,
               "error": str | null} -> {}
    claim      {"island", "token"} -> {}               takes an offered expert under a lease
    progress   {"island", "token", "row": {...}} -> {}   the worker's metrics row
    artifact   {"island", "token", "kind": "checkpoint" | "final" | "files",
               "step": int | null, "files": {path: FileRef}} -> {}
               the coordinator fetches each blob from the island and checks its sha256;
               a checkpoint's `meta.json` is written last, after its other files
    done       {"island", "token", "result": ExpertResult as a dict} -> {}
    failed     {"island", "token", "error": str, "input_error": {"where", "problem"} | null}
               -> {}

Paths are relative to the run directory (`RunLayout`), the same on both sides, and every
one is checked to stay inside the expert's own folder (inputs: inside the run). A token is
the fencing token of one lease: "<expert>.<attempt>.<random>"; anything sent under a token
the coordinator has revoked or superseded is refused with SUPERSEDED in the error, and the
island stops that attempt; one a resumed coordinator has still to re-establish is refused
with PENDING, and the island sends it again shortly. Nothing is ever unpickled: JSON,
safetensors and Parquet only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from runstore.errors import InputError
from runstore.paths import check_path  # the run's one rule for paths, shared with its files

COORD_PROTOCOL = "/islands/coord/1"
SUPERSEDED = "superseded"  # in a refusal: the lease is gone, stop the attempt
PENDING = "pending"        # in a refusal: a resumed coordinator is re-establishing the lease


@dataclass(frozen=True)
class FileRef:
    """A file of the run, as a blob: its root (to fetch it), sha256 and size."""
    root: str
    sha256: str
    size: int

    @classmethod
    def parse(cls, data: Any, where: str) -> FileRef:
        try:
            return cls(str(data["root"]), str(data["sha256"]), int(data["size"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(where, f"expected {{root, sha256, size}}, got {data!r}") from None


@dataclass(frozen=True)
class Offer:
    """An expert offered to one island: train `spec` (the worker's ExpertSpec as a dict)
    under `token`, after placing `inputs` (shards, a checkpoint to resume from, the
    expert's metrics and log so far) at their paths in the island's copy of the run."""
    token: str
    expert: int
    attempt: int
    spec: dict[str, Any]
    inputs: dict[str, FileRef] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "expert": self.expert, "attempt": self.attempt,
                "spec": self.spec,
                "inputs": {path: vars(ref) for path, ref in self.inputs.items()}}

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Offer:
        return cls(str(data["token"]), int(data["expert"]), int(data["attempt"]),
                   dict(data["spec"]),
                   {check_path(p, "offer input"): FileRef.parse(r, f"offer input {p}")
                    for p, r in data.get("inputs", {}).items()})


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def decode(payload: bytes, where: str) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError:
        raise InputError(where, "a coordination message is not JSON") from None
    if not isinstance(message, dict):
        raise InputError(where, f"a coordination message must be an object, got {message!r}")
    return message


def token_of(expert: int, attempt: int, nonce: str) -> str:
    return f"{expert}.{attempt}.{nonce}"


def expert_of(token: str) -> int:
    return int(token.split(".", 1)[0])
