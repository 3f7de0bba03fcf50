"""A decentralized run with an island that reaches the coordinator only through a relay, and
is reached by it only so. The coordinator and a second island share one site behind a NAT,
the island in question sits in another, and the relay on the public side
(tests/netns.py): neither site can open a connection into the other, so the coordinator
holds a reservation on the relay (`mesh.relays`) and that island joins with the
coordinator's circuit address; the blobs between them go over libp2p through the relay
(neither bulk port can be reached). Its expert's weights equal the Ray path's. Skipped, with
the reason, where the namespaces cannot be built (root, `ip`, `iptables`)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.mesh.identity import load_identity
from tests.mesh_daemons import Daemon, running
from tests.netns import connects, nat_namespaces, why_not
from tests.test_mesh_run import MeshRun, Site, ray_path_hashes

EXPERTS = {"steps": 20, "checkpoint_every": 10}   # two checkpoints each
NAMES = ["isl-far", "isl-near"]                    # behind the relay; beside the coordinator
START_SECONDS = 120.0
# Before the Ray path's run: nothing to compare where the namespaces cannot be built.
pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


@pytest.fixture(scope="module")
def ray_experts(tmp_path_factory, ray_session) -> dict:
    return ray_path_hashes(tmp_path_factory.mktemp("ray-path"), EXPERTS, "experts")


def wait_for(path: Path, text: str, process: subprocess.Popen,
             within: float = START_SECONDS) -> bool:
    """Whether `text` shows up in the log at `path` while `process` lives."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.2)
    return path.exists() and text in path.read_text()


def test_an_island_reached_only_through_a_relay_trains_the_ray_paths_expert(
        tmp_path, ray_experts):
    with nat_namespaces(["home", "far"]) as nat:
        home, far = (Site(nat.sites[s], nat.addresses[s]) for s in ("home", "far"))
        ids = {name: str(load_identity(tmp_path / f"{name}.key").peer_id)
               for name in ["relay", "coordinator", *NAMES]}
        relay = Daemon("relay", tmp_path, list(ids.values()), ids["relay"],
                       relay_service=True, host=nat.public_address, netns=nat.pub)
        with running({"relay": relay}, ""):
            run = MeshRun(tmp_path, NAMES, experts=EXPERTS, site=home, relays=[relay.address],
                          joined=[], until="experts")
            try:
                circuit = f"{relay.address}/p2p-circuit/p2p/{ids['coordinator']}"
                driver_log = tmp_path / "driver.log"
                # Listening, and holding its reservation: what it prints first.
                assert wait_for(driver_log, "listening on", run.driver), \
                    driver_log.read_text()[-3000:]
                run.join("isl-near", site=home)
                run.join("isl-far", coordinator=circuit, site=far)
                # Its own site reaches the coordinator, the far one only the relay.
                port = int(run.coordinator.split("/tcp/")[1].split("/")[0])
                assert connects(home.netns, home.host, port)
                assert not connects(far.netns, home.host, port)
                assert connects(far.netns, nat.public_address, relay.port)
                manifest = run.finish()
            finally:
                run.stop()
    # Rich wraps long lines: the logs are read unwrapped.
    log, far_log, near_log = ((tmp_path / f"{name}.log").read_text().replace("\n", "")
                              for name in ("driver", *NAMES))
    # It tells islands outside its network how to join: through the relay.
    assert f"--coordinator {circuit} " in log, log[-3000:]
    assert run.weights(manifest) == ray_experts
    by_island = {entry["island"]: int(k) for k, entry in manifest["experts"].items()}
    assert set(by_island) == set(NAMES), manifest["experts"]
    assert "joined run mesh-digits as isl-far" in far_log, far_log[-3000:]
    expert = run.root / "experts" / f"expert-{by_island['isl-far']}"
    assert list((expert / "checkpoints").glob("*/meta.json")), "no checkpoint came back"
    # Blob bytes between the far island and the coordinator could only go over libp2p
    # (through the relay), both ways, found out once and then remembered (not one connect
    # timeout per blob); the near island's went over the bulk channel.
    fallback = "blob bytes go over libp2p streams"
    assert log.count(f"peer {ids['isl-far']}: {fallback}") == 1, log[-3000:]
    assert far_log.count(f"peer {ids['coordinator']}: {fallback}") == 1, far_log[-3000:]
    assert f"peer {ids['isl-near']}: {fallback}" not in log
    assert fallback not in near_log
