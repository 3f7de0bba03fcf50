"""`islands island ...`: this machine as an island of a decentralized run.

`islands island join --coordinator MULTIADDR --name NAME --storage DIR` starts the island
agent (`orchestrator/mesh/island_agent.py`): its own mesh daemon, then join, heartbeats and
the experts the coordinator offers, until SIGTERM or Ctrl-C. One line per event.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import typer

from orchestrator.cli.common import handles_errors
from orchestrator.mesh.extra import require_libp2p
from orchestrator.state.config import (
    MeshConfig,
    check_listen_addr,
    check_peer_id,
    check_relay_addr,
)
from runstore.errors import InputError

DEFAULTS = MeshConfig()

island_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         help="This machine as an island of a decentralized run (mesh extra).")


def _checked(option: str, values: list[str], check: Callable[[str], str]) -> None:
    for value in values:
        try:
            check(value)
        except ValueError as err:
            raise InputError(option, f"{err} (got {value!r})") from None


@island_app.command("join")
@handles_errors
def join(coordinator: str = typer.Option(..., "--coordinator",
                                         help="The coordinator's multiaddr, ending in "
                                              "/p2p/<peer id>."),
         name: str = typer.Option(..., "--name", help="This island's name in the run."),
         storage: Path = typer.Option(..., "--storage",
                                      help="Folder for the key, blobs, and the run's files."),
         key: Path | None = typer.Option(None, "--key",
                                         help="Ed25519 key file (default STORAGE/island.key)."),
         listen: list[str] = typer.Option(list(DEFAULTS.listen), "--listen",
                                          help="TCP multiaddr to listen on (repeatable)."),
         relay: list[str] = typer.Option([], "--relay",
                                         help="A relay's multiaddr with its peer ID "
                                              "(repeatable), for an island behind a NAT."),
         roster: list[str] = typer.Option([], "--roster",
                                          help="Another peer ID allowed in (repeatable)."),
         network_key: Path | None = typer.Option(None, "--network-key",
                                                 help="The run's pre-shared network key."),
         cpus: int | None = typer.Option(None, "--cpus", min=1,
                                         help="CPUs offered (default: all)."),
         give_up_after: float | None = typer.Option(
             None, "--give-up-after", min=0.0,
             help="Exit (code 1) once the coordinator stayed unreachable this many seconds."),
         ) -> None:
    """Join a coordinator and train the experts it offers until stopped."""
    from orchestrator.mesh.island_agent import IslandAgent, check_name, coordinator_peers

    coordinator_peers(coordinator, "--coordinator")
    check_name(name, "--name")
    _checked("--listen", listen, check_listen_addr)
    _checked("--relay", relay, check_relay_addr)
    _checked("--roster", roster, check_peer_id)
    if network_key is not None and not network_key.expanduser().is_file():
        raise InputError("--network-key", f"no such file {str(network_key)!r}")
    require_libp2p()  # the daemon needs it: say so here, in one line
    agent = IslandAgent(coordinator, name, storage, key=key, listen=listen, relays=relay,
                        roster=roster, cpus=cpus, give_up_after=give_up_after,
                        network_key=network_key, say=typer.echo)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop())
    raise typer.Exit(agent.run())
