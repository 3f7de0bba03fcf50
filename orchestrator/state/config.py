"""The run's YAML, parsed into validated models. Unknown keys and wrong types are refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runstore.errors import InputError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    modality: str = Field("image", pattern=r"^[a-z][a-z0-9_]*$")
    """A registered modality: `image` or `text` (orchestrator/modalities)."""
    source: str = "builtin:mnist5k"
    """Images: `builtin:digits`, `builtin:mnist5k`, `builtin:fashion-mnist`; text:
    `builtin:fortunes`, `builtin:fortunes-multilingual`, `builtin:chatterbot`; or an fsspec
    URL of a Parquet file or folder."""
    image_column: str = "image"
    text_column: str = "text"
    label_column: str | None = "label"
    heldout_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    max_rows: int | None = Field(None, gt=0)
    """Read only the first rows."""
    sample_rows: int | None = Field(None, gt=0)
    """Keep a random sample of this many rows (seeded), after max_rows."""
    split: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    """The split to read (`train`, `test`, ...) of a source holding several (Hugging Face
    split files `train-00000-of-00002.parquet`, `test.jsonl`, `train/` folders), or of
    `builtin:fashion-mnist` (`train`, the default, or `test`)."""
    channels: Literal[1, 3] | None = None
    """Images: 1 (grey) or 3 (RGB), converting what differs; None: as the data is."""
    image_size: int | None = Field(None, ge=2, le=4096)
    """Images: the square side every image is brought to by `resize`; None: as the data
    is (one size only)."""
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    text_unit: Literal["line", "file"] = "line"
    """Text files (.txt): a document per line, or per file."""


class PartitionConfig(Section):
    clusters: int = Field(4, ge=1, le=1024)
    features: str | None = None
    """Extractor from the registry; default `pixels` for images, `tfidf` for text;
    `dinov2` and `clip` embed images with a pretrained model (`model_path`)."""
    model_path: str | None = Field(None, min_length=1)
    """The pretrained model of `dinov2` / `clip` features: a local folder (config.json and
    safetensors weights), or a hub id found in the local Hugging Face cache. Never
    downloaded."""
    pca_components: int = Field(32, ge=1)
    balance: bool = True
    balance_eps: float = Field(0.1, ge=0.0)
    kmeans_init: int = Field(4, ge=1)
    kmeans_iters: int = Field(100, ge=1)
    fit_rows: int | None = Field(None, ge=1)
    """Fit k-means on a sample of this many training rows, then assign every row in
    batches (faiss or scikit-learn, memory flat in the rows). None: 65,536 (all training
    rows of a smaller dataset)."""
    fine_clusters: int | None = Field(None, ge=2)
    """Hierarchical k-means as in DDM: this many fine centroids, grouped into `clusters`."""
    kmeans_backend: Literal["auto", "faiss", "sklearn"] = "auto"
    """For the sampled or hierarchical fit; auto: faiss when installed."""
    method: Literal["kmeans", "random"] = "kmeans"
    """kmeans: cluster by features; random: a balanced random split of the same sizes (the
    ablation that shows what clustering is worth). Centroids are still each part's mean
    feature, so later stages run unchanged."""

    @model_validator(mode="after")
    def _check(self) -> PartitionConfig:
        if self.method == "random" and (self.fit_rows or self.fine_clusters):
            raise ValueError("method random fits no k-means: drop fit_rows and fine_clusters")
        return self


class ExpertConfig(Section):
    monolith: bool = False
    """Train one model on all data with the same code (forces one cluster)."""
    model: str | None = None
    """Architecture from the registry; default `unet` for images, `byte_lm` for text."""
    channels: int = Field(32, ge=4)
    channel_mult: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 2, 2), min_length=1)
    """U-Net: width of each level in multiples of `channels`; each level after the first
    halves the image."""
    patch: int = Field(2, ge=1, le=8)
    """Pixels folded into channels per side before the U-Net (space-to-depth)."""
    context: int = Field(256, ge=8)
    """Byte LM: tokens of context."""
    width: int = Field(128, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    seed_steps: int = Field(0, ge=0)
    """Branch-Train-Merge: train one seed model this many steps on all data, then branch
    every expert from it (text and images alike)."""
    seed_batch_size: int | None = Field(None, ge=1)
    """The seed model's batch; None: `batch_size`. With experts at B/K, a seed at B is the
    monolith branched after `seed_steps` (the DDM protocol's BTM arm)."""
    steps: int = Field(2000, ge=1)
    steps_by: Literal["fixed", "rows"] = "fixed"
    """fixed: every expert trains `steps`; rows: steps in proportion to the shard's rows, the
    same total (steps x experts), so a larger cluster gets more of the compute."""
    batch_size: int = Field(64, ge=1)
    """The effective batch of every expert, whatever its island: micro-batches and gradient
    accumulation are fitted per island."""
    lr: float = Field(2e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After the warm-up: cosine decay to a tenth of `lr` at `steps`, or constant at `lr`
    (the DDM protocol: experts and monolith at one constant rate)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear learning-rate warm-up. Left unset, it is min(100, steps / 10), so a config
    scaled down to a few steps still reaches `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    async_checkpoints: bool = True
    """Store checkpoints in a background thread from a copy taken between two steps, so
    training does not wait on storage; a crash mid-write then also loses the steps trained
    during that write. False: training waits until each checkpoint is stored."""
    threads: int = Field(1, ge=1)
    log_every: int = Field(25, ge=1)
    snapshot_at: tuple[float, ...] = ()
    """Fractions of `steps` in (0, 1]: at step round(f x steps) the trainer keeps a permanent
    snapshot (EMA and raw weights, samples seen, FLOPs) under `snapshots/`, never pruned, so
    one run gives a learning curve that can be scored afterwards."""

    @field_validator("snapshot_at")
    @classmethod
    def _check_snapshot_at(cls, fractions: tuple[float, ...]) -> tuple[float, ...]:
        if bad := [f for f in fractions if not 0 < f <= 1]:
            raise ValueError(f"expected fractions of steps in (0, 1], not {bad}")
        return tuple(sorted(set(fractions)))

    @model_validator(mode="before")
    @classmethod
    def _default_warmup(cls, data: Any) -> Any:
        if isinstance(data, dict) and "warmup_steps" not in data:
            steps = data.get("steps", cls.model_fields["steps"].default)
            if isinstance(steps, int) and not isinstance(steps, bool):
                data = {**data, "warmup_steps": min(100, max(0, steps) // 10)}
        return data

    @model_validator(mode="after")
    def _warmup(self) -> ExpertConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than "
                             f"steps ({self.steps}): the learning rate would never "
                             "reach lr")
        return self


class RouterConfig(Section):
    temperature: float = Field(0.1, gt=0)
    """c-BTM: weight of expert k is softmax(-|e - c_k|^2 / temperature)."""
    refresh_every: int = Field(0, ge=0)
    """c-BTM generation: recompute routing every N new tokens (0: from the prompt only)."""
    channels: int = Field(32, ge=4)
    patch: int = Field(2, ge=1, le=8)
    """The router sees the image in patch x patch pixel blocks: 4 costs about a third of 2 at
    sampling time, for a router that runs once per step beside the experts."""
    steps: int = Field(800, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    threads: int = Field(2, ge=1)


class Accelerators(Section):
    type: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """As Ray names it in the node's `accelerator_type:<type>` resource, e.g. H100, A100."""
    count: int = Field(1, ge=1)
    memory_gb: float = Field(gt=0)
    """Memory of one accelerator."""


class IslandSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    node_labels: dict[str, str] = {}
    """Find the island's nodes by Ray node labels (`ray start --labels k=v`) instead of the
    custom resource `island:<name>`."""
    accelerators: Accelerators | None = None
    """None: a CPU island."""
    cpus: int | None = Field(None, ge=1)
    """CPUs the island has; each worker gets cpus // (slots x workers) threads. None:
    experts.threads."""
    memory_gb: float | None = Field(None, gt=0)
    """Memory one worker may train in; the micro-batch is fitted to it. Default: the
    accelerator's memory; None on a CPU island: the whole per-worker batch at once."""
    speed: float | None = Field(None, gt=0)
    """Relative throughput of one slot. None: measured by a short calibration run on the
    island before placement."""
    slots: int = Field(1, ge=1)
    """Experts the island trains at once."""
    workers: int | None = Field(None, ge=1)
    """Data-parallel workers per expert, inside the island only. Default: the island's
    accelerators shared among its slots, else 1."""
    peer: str | None = None
    """With `islands.launcher: mesh`: the peer ID that alone may join as this island (from
    `islands mesh id`). None: any roster peer may take the name."""

    @field_validator("peer")
    @classmethod
    def _check_peer(cls, peer: str | None) -> str | None:
        return None if peer is None else check_peer_id(peer)

    @model_validator(mode="after")
    def _check(self) -> IslandSpec:
        if self.accelerators and self.slots * self.data_parallel > self.accelerators.count:
            raise ValueError(f"island {self.name}: slots x workers = "
                             f"{self.slots * self.data_parallel} exceeds its "
                             f"{self.accelerators.count} accelerators")
        return self

    @property
    def data_parallel(self) -> int:
        if self.workers:
            return self.workers
        if self.accelerators:
            return max(1, self.accelerators.count // self.slots)
        return 1

    @property
    def worker_memory_gb(self) -> float | None:
        if self.memory_gb:
            return self.memory_gb
        return self.accelerators.memory_gb if self.accelerators else None

    def threads(self, default: int) -> int:
        if self.cpus is None:
            return default
        return max(1, self.cpus // (self.slots * self.data_parallel))


class IslandsConfig(Section):
    launcher: Literal["ray", "mesh"] = "ray"
    """ray: the islands are Ray nodes of one cluster. mesh: island agents on machines with
    no shared cluster or storage join this driver over the libp2p mesh (`islands island
    join`), each under a name from `pool`."""
    address: str | None = None
    """Ray address of an existing cluster; None starts a local Ray with virtual islands."""
    local: int = Field(2, ge=1)
    """Virtual islands of the embedded local Ray (one CPU each)."""
    pool: tuple[IslandSpec, ...] = ()
    """Named islands; empty means local-0 .. local-(local-1)."""

    @model_validator(mode="after")
    def _check(self) -> IslandsConfig:
        names = [spec.name for spec in self.pool]
        if len(set(names)) != len(names):
            raise ValueError("island names must be unique")
        given = {spec.speed is not None for spec in self.pool}
        if len(given) > 1:
            raise ValueError("give every island a speed, or none (then all are calibrated): "
                             "a relative speed and a measured one have no common unit")
        return self

    def specs(self) -> tuple[IslandSpec, ...]:
        if self.pool:
            return self.pool
        # Identical virtual islands: equal speed by construction, nothing to calibrate.
        return tuple(IslandSpec(name=f"local-{i}", speed=1.0) for i in range(self.local))


class FaultToleranceConfig(Section):
    max_retries: int = Field(2, ge=0)
    """Relaunches of a failed expert (worker killed, node lost), each from its last good
    checkpoint."""
    lease_seconds: float = Field(60.0, gt=0)
    """How long the run lease outlives a driver that stopped renewing it."""
    on_expert_failure: Literal["continue", "abort"] = "continue"
    """An expert that failed after all its retries: the others train on (`continue`; the
    run then ends with an error naming it) or are stopped at once (`abort`)."""
    island_wait_seconds: float = Field(600.0, gt=0)
    """How long the driver waits for an island to come back when no island is left to run
    an expert on; then it stops (exit code 1) and `islands resume` continues."""
    placement_timeout_seconds: float = Field(300.0, gt=0)
    """How long a data-parallel gang's placement group may wait to be scheduled on its
    island; then the attempt fails naming what the island lacks, and the expert moves to
    another island that fits, or the run stops."""


class TrackingConfig(Section):
    wandb: Literal["auto", "offline", "online", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set where the experts train, offline otherwise."""
    project: str = "islands"


class InferenceConfig(Section):
    strategy: Literal["top1", "topk", "full"] = "top1"
    top_k: int = Field(2, ge=1)
    sample_steps: int = Field(40, ge=1)
    samples: int = Field(64, ge=1)
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0)
    """Text sampling temperature; 0 is greedy."""


class EvalConfig(Section):
    heldout_rows: int = Field(512, ge=1)
    noise_bins: int = Field(10, ge=2)
    strategies: tuple[Literal["top1", "topk", "full"], ...] = ("top1", "topk", "full")
    prefix_bytes: int = Field(32, ge=1)
    """Text: route on a held-out text's first bytes, score the bytes after them."""


# The base58btc alphabet of legacy peer IDs (the form `islands mesh id` prints).
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_TCP_MULTIADDR = re.compile(r"^/(ip4|ip6)/[^/]+/tcp/\d{1,5}$")
_RELAY_MULTIADDR = re.compile(r"^(/(ip4|ip6)/[^/]+/tcp/\d{1,5})/p2p/([^/]+)$")


def check_peer_id(text: str) -> str:
    """A base58 peer ID whose bytes are a multihash libp2p derives from a public key:
    identity (inlined key, `12D3KooW...` for Ed25519) or sha256 (`Qm...`). Checked here
    without libp2p so that configs validate where the mesh extra is not installed."""
    expected = "expected a base58 peer ID such as 12D3KooW... (from `islands mesh id`)"
    if not text or any(char not in _BASE58 for char in text):
        raise ValueError(expected)
    number = 0
    for char in text:
        number = number * 58 + _BASE58.index(char)
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + body
    if len(raw) < 2 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2 \
            or (raw[0] == 0x12 and raw[1] != 32) or (raw[0] == 0x00 and raw[1] > 42):
        raise ValueError(expected)
    return text


def check_listen_addr(text: str) -> str:
    if not _TCP_MULTIADDR.match(text):
        raise ValueError("expected a TCP multiaddr such as /ip4/0.0.0.0/tcp/4001 "
                         "(the mesh offers TCP only)")
    return text


def check_relay_addr(text: str) -> str:
    match = _RELAY_MULTIADDR.match(text)
    if not match:
        raise ValueError("expected a relay's TCP multiaddr with its peer ID, such as "
                         "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...")
    check_peer_id(match.group(3))
    return text


def relay_peer_id(address: str) -> str:
    """The peer ID at the end of a relay address that `check_relay_addr` accepted."""
    return address.rsplit("/p2p/", 1)[1]


PeerId = Annotated[str, AfterValidator(check_peer_id)]
ListenAddr = Annotated[str, AfterValidator(check_listen_addr)]
RelayAddr = Annotated[str, AfterValidator(check_relay_addr)]


class BulkConfig(Section):
    """The bulk channel: blob bytes on a TCP port of their own, sealed with AES-GCM under
    keys from a ticket handed out over the mesh (libp2p's own streams cost several CPU
    seconds per GB)."""

    enabled: bool = True
    """Serve and fetch blobs over the bulk channel; off, or unreachable: libp2p streams."""
    listen: ListenAddr = "/ip4/0.0.0.0/tcp/0"
    """Where the bulk server listens; port 0 picks a free one."""
    announce: tuple[ListenAddr, ...] = ()
    """Addresses peers should dial for it first (a forwarded port, a public address);
    the address a peer reaches this one at over the mesh is always tried after them."""


class MeshConfig(Section):
    """Decentralized mode: this peer's libp2p identity and who may connect to it. Nothing
    here changes a run that does not use the mesh."""

    listen: tuple[ListenAddr, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """TCP multiaddrs to listen on; port 0 picks a free one."""
    key: str = "~/.islands/mesh.key"
    """This peer's Ed25519 private key, created (mode 0600) on first use."""
    roster: tuple[PeerId, ...] = ()
    """Peer IDs allowed in; any other peer is refused at the handshake."""
    roster_epoch: int = Field(0, ge=0)
    """Version of the roster; a roster with a lower epoch never replaces a newer one."""
    network_key: str | None = None
    """Pre-shared key file (private network); peers without the same key cannot connect."""
    relay_service: bool = False
    """Relay (Circuit Relay v2) for roster peers: they reserve a slot here, and peers that
    cannot dial them reach them through this peer. Anyone off the roster is refused."""
    relays: tuple[RelayAddr, ...] = ()
    """Roster peers that relay for this one (`/ip4/HOST/tcp/PORT/p2p/ID`): it keeps a
    reservation on each, so peers that cannot dial it (a NAT) reach it at
    `RELAY/p2p-circuit/p2p/SELF`."""
    bulk: BulkConfig = BulkConfig()
    heartbeat_seconds: float = Field(0.5, gt=0)
    """How often an island agent reports to the coordinator (decentralized runs)."""
    lease_seconds: float = Field(10.0, gt=0)
    """An island silent this long has lost its leases: its experts are offered again (an
    island whose connection drops, as when it is killed, is taken as gone at once)."""
    join_seconds: float = Field(600.0, gt=0)
    """How long the coordinator waits for every island of `islands.pool` to join before it
    places the experts on those that did."""

    @field_validator("relays")
    @classmethod
    def _check_relays(cls, relays: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # The roster gate would refuse such a relay at the handshake: say so up front.
        roster = info.data.get("roster")
        off = [a for a in relays if roster is not None and relay_peer_id(a) not in roster]
        if off:
            raise ValueError(f"relay {relay_peer_id(off[0])} is not on mesh.roster")
        return relays


class RunConfig(Section):
    run: str
    storage: str = "file://./runs"
    seed: int = 0
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    experts: ExpertConfig = ExpertConfig()
    router: RouterConfig = RouterConfig()
    islands: IslandsConfig = IslandsConfig()
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    tracking: TrackingConfig = TrackingConfig()
    inference: InferenceConfig = InferenceConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()

    @field_validator("run")
    @classmethod
    def _run_name(cls, name: str) -> str:
        # The run's folder under storage: `..` would put it elsewhere, a leading dot could
        # be the storage itself (`.`) or a folder islands keeps there (`.datasets`).
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or ".." in name:
            raise ValueError("expected a folder name of letters, digits, '_', '-' and '.', "
                             "not starting with '.' and without '..'")
        return name

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.experts.width % self.experts.heads:
            raise ValueError("experts.width must be a multiple of experts.heads")
        return self

    @property
    def clusters(self) -> int:
        return 1 if self.experts.monolith else self.partition.clusters

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required field is missing"
    message = re.sub(r"^Value error, ", "", error["msg"])
    return f"{path}: {message} (got {error.get('input')!r})"


def parse_config(raw: Any, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise InputError(source, "expected a YAML mapping at the top level")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise InputError(source, problems) from None


# libyaml's safe loader where PyYAML has it: the same documents, 10x faster than the pure
# Python one (a config of 64 islands: 6 ms against 60 ms, read by every verb on a run).
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(text: str | bytes) -> Any:
    """A YAML document, safely: plain data only, no tags that build objects."""
    return yaml.load(text, Loader=SAFE_LOADER)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "config file not found")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(str(path), f"not valid YAML ({err})") from None
    if overrides:
        raw = {**(raw or {}), **overrides}
    return parse_config(_source_beside(raw, path), str(path))


def _source_beside(raw: Any, path: Path) -> Any:
    """A relative local `data.source` is relative to the config file's folder, so the
    config works from any working directory."""
    data = raw.get("data") if isinstance(raw, dict) else None
    source = data.get("source") if isinstance(data, dict) else None
    if (not isinstance(source, str) or not source or source.startswith("builtin:")
            or "://" in source or Path(source).expanduser().is_absolute()):
        return raw
    if source.startswith("~"):
        resolved = str(Path(source).expanduser())
    else:
        resolved = str((path.parent / source).resolve())
    return {**raw, "data": {**data, "source": resolved}}


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.dump(), sort_keys=False)
