"""The coordinator's answers to island agents, without a network: MeshLauncher's handlers
called directly, as its serving thread calls them, on a run directory with a real shard.
What an island may join as, claim and publish, and what the fencing tokens refuse."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.control.expert_specs import expert_spec
from orchestrator.control.launcher import IslandLost
from orchestrator.mesh.coordination import PENDING, SUPERSEDED, Offer
from orchestrator.mesh.identity import load_identity
from orchestrator.mesh.launcher import MeshLauncher, Refused
from orchestrator.state.config import parse_config
from runstore import storage
from runstore.layout import RunLayout
from tests.conftest import recipe, tiny_config


@pytest.fixture
def coordinator(tmp_path):
    ids = {name: str(load_identity(tmp_path / f"{name}.key").peer_id)
           for name in ("a", "b", "other")}
    config = parse_config(tiny_config(
        str(tmp_path / "runs"), islands={"launcher": "mesh", "pool": [
            {"name": "isl-a", "speed": 1.0, "peer": ids["a"]}, {"name": "isl-b", "speed": 1.0}]},
        mesh={"roster": [ids["a"], ids["b"]]}))
    layout = RunLayout(storage.join(str(tmp_path / "runs"), config.run))
    for cluster in (0, 1):
        storage.write_bytes(layout.shard(cluster), f"shard {cluster}".encode())
    launcher = MeshLauncher(config, layout)
    launcher.connected = {ids["a"], ids["b"]}
    yield launcher, ids, config
    launcher.workers.shutdown()


def offer(launcher: MeshLauncher, config, expert: int, island: str, attempt: int = 1):
    spec = expert_spec(config, launcher.layout, expert, launcher.pool[island], recipe(config),
                       steps=10, attempt=attempt)
    return launcher.start(spec, launcher.pool[island])


def test_an_island_joins_only_under_a_pool_name_and_its_bound_peer(coordinator):
    launcher, ids, _ = coordinator
    with pytest.raises(Refused, match="no island 'isl-z'"):
        launcher.on_join(ids["b"], {"island": "isl-z"})
    with pytest.raises(Refused, match="bound to peer"):
        launcher.on_join(ids["b"], {"island": "isl-a"})
    assert launcher.on_join(ids["a"], {"island": "isl-a", "capacity": {"cpus": 2}})["run"]
    launcher.on_join(ids["b"], {"island": "isl-b"})   # isl-b is bound to no peer
    with pytest.raises(Refused, match="already joined by peer"):
        launcher.on_join(ids["a"], {"island": "isl-b"})
    assert launcher.present_islands([]) == {"isl-a", "isl-b"}


def test_offers_ride_on_the_heartbeat_and_only_the_offered_island_claims(coordinator):
    launcher, ids, config = coordinator
    launcher.on_join(ids["a"], {"island": "isl-a"})
    launcher.on_join(ids["b"], {"island": "isl-b"})
    attempt = offer(launcher, config, 0, "isl-a")
    answer = launcher.on_heartbeat(ids["a"], {"island": "isl-a", "tokens": []})
    offered = Offer.parse(answer["offers"][0])
    assert offered.token == attempt.token and offered.expert == 0
    assert "partition/shards/cluster=0/part-0.parquet" in offered.inputs
    assert launcher.on_heartbeat(ids["b"], {"island": "isl-b", "tokens": []})["offers"] == []
    with pytest.raises(Refused, match="never offered to island isl-b"):
        launcher.on_claim(ids["b"], {"island": "isl-b", "token": attempt.token})
    with pytest.raises(Refused, match="has not joined as island isl-a"):
        launcher.on_claim(ids["b"], {"island": "isl-a", "token": attempt.token})
    launcher.on_claim(ids["a"], {"island": "isl-a", "token": attempt.token})
    answer = launcher.on_heartbeat(ids["a"], {"island": "isl-a", "tokens": [attempt.token]})
    assert answer == {"offers": [], "revoked": []}


def test_a_revoked_or_replaced_token_can_publish_nothing(coordinator):
    launcher, ids, config = coordinator
    launcher.on_join(ids["a"], {"island": "isl-a"})
    old = offer(launcher, config, 1, "isl-a")
    launcher.on_claim(ids["a"], {"island": "isl-a", "token": old.token})
    launcher.cancel(old)   # the controller saw the island gone, or the user cancelled
    ended = launcher.poll(1.0)
    assert [e.attempt for e in ended] == [old] and "revoked" in str(ended[0].error)
    new = offer(launcher, config, 1, "isl-a", attempt=2)
    stale = {"island": "isl-a", "token": old.token}
    for handler, extra in ((launcher.on_progress, {"row": {"expert": 1, "step": 5}}),
                           (launcher.on_artifact, {"kind": "checkpoint", "files": {}}),
                           (launcher.on_done, {"result": {}}),
                           (launcher.on_failed, {"error": "late"})):
        with pytest.raises(Refused, match=SUPERSEDED):
            handler(ids["a"], {**stale, **extra})
    answer = launcher.on_heartbeat(ids["a"], {"island": "isl-a", "tokens": [old.token]})
    assert answer["revoked"] == [old.token] and answer["offers"][0]["token"] == new.token
    assert launcher.progress_rows() == {} and launcher.poll(0.1) == []


def test_an_artifact_outside_its_experts_folder_is_refused(coordinator):
    launcher, ids, config = coordinator
    launcher.on_join(ids["a"], {"island": "isl-a"})
    attempt = offer(launcher, config, 0, "isl-a")
    launcher.on_claim(ids["a"], {"island": "isl-a", "token": attempt.token})
    ref = {"root": "0" * 64, "sha256": "0" * 64, "size": 1}
    for path in ("experts/expert-1/final/model.safetensors", "../escape", "manifest.json",
                 "experts/expert-0/../../manifest.json", "/etc/passwd"):
        with pytest.raises(Exception, match="not a plain relative path inside"):
            launcher.on_artifact(ids["a"], {"island": "isl-a", "token": attempt.token,
                                            "kind": "files", "files": {path: ref}})


def test_done_is_refused_until_the_final_files_were_pushed(coordinator):
    launcher, ids, config = coordinator
    launcher.on_join(ids["a"], {"island": "isl-a"})
    attempt = offer(launcher, config, 0, "isl-a")
    launcher.on_claim(ids["a"], {"island": "isl-a", "token": attempt.token})
    result = {"artifacts": {"experts/expert-0/final/model.safetensors": "ab" * 32}}
    with pytest.raises(Refused, match="was not pushed"):
        launcher.on_done(ids["a"], {"island": "isl-a", "token": attempt.token,
                                    "result": result})
    assert launcher.poll(0.1) == []


def test_a_resumed_coordinator_takes_back_the_leases_its_islands_still_hold(coordinator):
    """The first coordinator dies with two leases out (kept in mesh/leases.json). A second
    one on the same run: isl-a reports its token and keeps it, under the same token, with
    nothing to fetch; isl-b restarted and lost its attempt, so expert 1 starts anew."""
    first, ids, config = coordinator
    for name in ("isl-a", "isl-b"):
        first.on_join(ids[name[-1]], {"island": name})
    kept, lost = offer(first, config, 0, "isl-a"), offer(first, config, 1, "isl-b")
    for attempt in (kept, lost):
        first.on_claim(ids[attempt.island[-1]], {"island": attempt.island,
                                                 "token": attempt.token})
    second = MeshLauncher(config, first.layout)
    second._load_leases()
    second.connected = {ids["a"], ids["b"]}
    try:
        second.on_join(ids["a"], {"island": "isl-a"})
        second.on_join(ids["b"], {"island": "isl-b"})
        held = {"island": "isl-a", "tokens": [kept.token]}
        # Not yet decided: kept, not revoked; what it sends meanwhile is put off, not refused.
        assert second.on_heartbeat(ids["a"], held) == {"offers": [], "revoked": []}
        with pytest.raises(Refused, match=PENDING):
            second.on_progress(ids["a"], {**held, "token": kept.token, "row": {"expert": 0}})
        assert second.carried_over([0, 1]) == {0: "isl-a"}
        again = offer(second, config, 0, "isl-a", attempt=2)
        assert again.token == kept.token and again.offer.inputs == {}
        assert again.claimed_by == ids["a"]
        assert second.on_heartbeat(ids["a"], held) == {"offers": [], "revoked": []}
        second.on_progress(ids["a"], {**held, "token": kept.token,
                                      "row": {"expert": 0, "attempt": 1, "step": 7}})
        assert second.progress_rows()[0]["attempt"] == 2   # this driver's attempt number
        fresh = offer(second, config, 1, "isl-b", attempt=2)
        assert fresh.token != lost.token and fresh.offer.inputs
        # The lost token, reported late, is revoked.
        answer = second.on_heartbeat(ids["b"], {"island": "isl-b", "tokens": [lost.token]})
        assert answer["revoked"] == [lost.token]
        leases = storage.read_json(second.leases_url)["leases"]
        assert {k: v["token"] for k, v in leases.items()} == {"0": kept.token,
                                                              "1": fresh.token}
    finally:
        second.workers.shutdown()


def test_a_cancelled_lease_is_told_to_its_island_and_a_gone_island_loses_its_leases(
        coordinator):
    launcher, ids, config = coordinator
    launcher.on_join(ids["a"], {"island": "isl-a"})
    launcher.on_join(ids["b"], {"island": "isl-b"})
    cancelled, orphaned = offer(launcher, config, 0, "isl-a"), offer(launcher, config, 1,
                                                                     "isl-b")
    for attempt in (cancelled, orphaned):
        launcher.on_claim(ids[attempt.island[-1]], {"island": attempt.island,
                                                    "token": attempt.token})
    launcher.cancel(cancelled)   # `islands cancel`: the island hears it at its heartbeat
    assert launcher.untold == {cancelled.token: "isl-a"}
    answer = launcher.on_heartbeat(ids["a"], {"island": "isl-a", "tokens": [cancelled.token]})
    assert answer["revoked"] == [cancelled.token] and launcher.untold == {}
    # isl-b's connection drops (killed): its lease ends at once, as a lost island.
    launcher.check_islands({ids["a"]})
    ended = {e.attempt.token: e.error for e in launcher.poll(1.0)}
    assert isinstance(ended[orphaned.token], IslandLost)
    assert launcher.present_islands([]) == {"isl-a"}


def test_islands_without_a_speed_are_measured_on_the_island_and_kept(tmp_path):
    """The pool gives no speed: each joined island is asked, on its heartbeat's answer, to
    time the probe expert's training step; the answers place the experts and are kept in
    calibration.json (so a resume asks nothing again)."""
    ids = {name: str(load_identity(tmp_path / f"{name}.key").peer_id) for name in "ab"}
    config = parse_config(tiny_config(
        str(tmp_path / "runs"), islands={"launcher": "mesh", "pool": [
            {"name": "isl-a"}, {"name": "isl-b"}]},
        mesh={"roster": list(ids.values()), "join_seconds": 30}))
    layout = RunLayout(storage.join(str(tmp_path / "runs"), config.run))
    for cluster in (0, 1):
        storage.write_bytes(layout.shard(cluster), f"shard {cluster}".encode())
    launcher = MeshLauncher(config, layout)
    launcher.connected = set(ids.values())

    def probe(island: str):
        return expert_spec(config, layout, 0, launcher.pool[island], recipe(config), steps=10)

    speeds: dict[str, float] = {}
    measuring = threading.Thread(target=lambda: speeds.update(
        launcher.island_speeds(config, layout, probe)))
    try:
        for name in ("isl-a", "isl-b"):
            launcher.on_join(ids[name[-1]], {"island": name})
        measuring.start()
        asked = {}
        deadline = time.monotonic() + 30
        while len(asked) < 2 and time.monotonic() < deadline:
            for name in ("isl-a", "isl-b"):
                answer = launcher.on_heartbeat(ids[name[-1]], {"island": name, "tokens": []})
                if "calibrate" in answer:
                    asked[name] = Offer.parse(answer["calibrate"])
            time.sleep(0.05)
        assert asked["isl-a"].spec["expert"] == 0 and asked["isl-a"].attempt == 0
        assert "partition/shards/cluster=0/part-0.parquet" in asked["isl-a"].inputs
        with pytest.raises(Refused, match="no speed measurement"):   # not its request
            launcher.on_speed(ids["a"], {"island": "isl-a", "token": asked["isl-b"].token,
                                         "result": {"samples_per_s": 1.0}})
        with pytest.raises(Refused, match="positive"):
            launcher.on_speed(ids["a"], {"island": "isl-a", "token": asked["isl-a"].token,
                                         "result": {"samples_per_s": 0}})
        for name, rate in (("isl-a", 300.0), ("isl-b", 100.0)):
            launcher.on_speed(ids[name[-1]], {"island": name, "token": asked[name].token,
                                              "result": {"samples_per_s": rate}})
        measuring.join(30)
        assert speeds == {"isl-a": 300.0, "isl-b": 100.0}
        kept = storage.read_json(layout.calibration)
        assert kept["isl-b"]["samples_per_s"] == 100.0 and "measured" in kept["isl-b"]
        # Measured once: asked again, the islands are not.
        assert launcher.island_speeds(config, layout, probe) == speeds
        assert "calibrate" not in launcher.on_heartbeat(ids["a"], {"island": "isl-a",
                                                                   "tokens": []})
    finally:
        launcher.workers.shutdown()


def test_a_lease_lapsed_in_a_partition_is_taken_back_if_not_reassigned_else_refused(
        coordinator):
    launcher, ids, config = coordinator
    launcher.on_join(ids["a"], {"island": "isl-a"})
    launcher.on_join(ids["b"], {"island": "isl-b"})
    first = offer(launcher, config, 0, "isl-a")
    launcher.on_claim(ids["a"], {"island": "isl-a", "token": first.token})
    held = {"island": "isl-a", "tokens": [first.token]}
    launcher.check_islands({ids["b"]})   # isl-a cut off: its attempt ends
    assert isinstance(launcher.poll(1.0)[0].error, IslandLost)
    launcher.check_islands({ids["a"], ids["b"]})   # back, before its expert started again
    row = {"island": "isl-a", "token": first.token, "row": {"expert": 0, "attempt": 1}}
    with pytest.raises(Refused, match=PENDING):   # even before its heartbeat says it holds it
        launcher.on_progress(ids["a"], row)
    assert launcher.on_heartbeat(ids["a"], held) == {"offers": [], "revoked": []}
    again = offer(launcher, config, 0, "isl-a", attempt=2)   # not reassigned: taken back
    assert again.token == first.token and again.carried_over and again.claimed_by == ids["a"]
    launcher.on_progress(ids["a"], row)   # its late work is accepted
    assert launcher.progress_rows()[0]["attempt"] == 2
    launcher.check_islands({ids["b"]})   # cut off again, and this time reassigned
    launcher.poll(1.0)
    moved = offer(launcher, config, 0, "isl-b", attempt=3)
    assert moved.token != first.token and not moved.carried_over
    launcher.check_islands({ids["a"], ids["b"]})
    assert launcher.on_heartbeat(ids["a"], held)["revoked"] == [first.token]
    with pytest.raises(Refused, match=SUPERSEDED):
        launcher.on_progress(ids["a"], row)


def test_an_island_that_lacks_what_the_pool_declares_is_refused_at_its_join(tmp_path):
    peer = str(load_identity(tmp_path / "a.key").peer_id)
    config = parse_config(tiny_config(
        str(tmp_path / "runs"), islands={"launcher": "mesh", "pool": [
            {"name": "gpu", "cpus": 8, "accelerators": {"type": "A100", "count": 2,
                                                       "memory_gb": 80}}]},
        mesh={"roster": [peer]}))
    launcher = MeshLauncher(config, RunLayout(storage.join(str(tmp_path / "runs"),
                                                           config.run)))
    try:
        with pytest.raises(Refused, match="8 CPUs, but the agent offers 2"):
            launcher.on_join(peer, {"island": "gpu", "capacity": {"cpus": 2}})
        with pytest.raises(Refused, match="2 x A100, but the agent finds no accelerators"):
            launcher.on_join(peer, {"island": "gpu", "capacity": {"cpus": 8,
                                                                  "accelerators": None}})
        gpus = {"type": "NVIDIA A100-SXM4-80GB", "count": 2, "memory_gb": 80.0}
        assert launcher.on_join(peer, {"island": "gpu", "capacity": {"cpus": 16,
                                                                     "accelerators": gpus}})
    finally:
        launcher.workers.shutdown()
