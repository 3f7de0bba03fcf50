"""A stand-in driver for the lease tests: it holds a run's lease and writes its fenced
manifest every 20 ms, as the controller does while experts train, until it loses the run;
then it prints the one line the CLI would and exits 2.

    python -m tests.lease_driver RUN_URL LEASE_SECONDS
"""

from __future__ import annotations

import sys
import time

from orchestrator.state.lease import RunLease
from orchestrator.state.manifest import Manifest
from runstore.errors import LeaseLost
from runstore.layout import RunLayout


def main(root: str, seconds: float) -> int:
    layout = RunLayout(root)
    try:
        with RunLease(layout, seconds) as lease:
            manifest = Manifest.open(layout, "frozen", clusters=1, lease=lease)
            print(f"holding epoch {lease.epoch}", flush=True)
            while True:
                manifest.data["writer"] = "old"
                manifest.data["writes"] = manifest.data.get("writes", 0) + 1
                manifest.save()
                time.sleep(0.02)
    except LeaseLost as err:
        print(f"error: {err}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
