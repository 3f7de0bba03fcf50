"""What becomes of an expert whose attempt ended without finishing, decided by why it ended
(the shape of Ray Train V2's FailurePolicy). Only a crash uses up one of the expert's
retries: a cancel, a stopped driver, a lost island or node, or an island unfit for the
expert say nothing about the expert itself. Only bad input that no island can help (the data, a
config error) aborts the run; an expert that fails leaves the others training unless
`fault_tolerance.on_expert_failure` is `abort`.

The cause is written into the manifest with the attempt (`cause`, beside its `reason`);
`cause_of` reads a reason back, so a resumed run counts the retries its earlier drivers
used, also in manifests written before `cause` was recorded."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

CANCELLED = "cancelled by the user"
DRIVER_STOPPED = "driver stopped during the attempt"
FINISHED = "finished"
NODE_RESTARTED = "the Ray node died; the driver restarted its embedded Ray"
_LOST_ISLAND = re.compile(r"island \S+ left the cluster")
_UNFIT_ISLAND = re.compile(r"island (\S+) cannot run it: .*", re.DOTALL)
_INPUT_ERROR = "input error: "
# An InputError about one island of the pool (its memory, its accelerators): another
# island may do.
_ISLAND_FIELD = re.compile(r"^islands\.pool\[([^\]]+)\]")


class Cause(Enum):
    FINISHED = "finished"
    CRASH = "crash"  # worker died, out of memory, an exception in training
    LOST_ISLAND = "lost island"  # the island left the cluster during the attempt
    CANCELLED = "cancelled"  # `islands cancel`
    DRIVER_STOPPED = "driver stopped"  # found by the next driver
    INPUT_ERROR = "input error"  # a bad shard or checkpoint
    UNFIT_ISLAND = "unfit island"  # an input error particular to the island it ran on
    LOST_NODE = "lost node"  # the embedded Ray's node died under it and was restarted


class FailureDecision(Enum):
    RESTART = "restart"  # again on the same island, from its last checkpoint
    MOVE = "move"  # again on another island: its own is gone
    FAIL_EXPERT = "fail expert"  # it crashed more often than max_retries allows
    ABORT_RUN = "abort run"  # bad input: no retry can help


def lost_island_reason(island: str) -> str:
    return f"island {island} left the cluster"


def unfit_island_reason(island: str, error: BaseException) -> str:
    return f"island {island} cannot run it: {error}"


def unfit_island(where: str) -> str | None:
    """The island an InputError is about (`islands.pool[NAME]...`), or None."""
    match = _ISLAND_FIELD.match(where)
    return match.group(1) if match else None


def input_error_reason(error: BaseException) -> str:
    return f"{_INPUT_ERROR}{error}"


def crash_reason(error: BaseException) -> str:
    """The error's type and first line: enough to tell crashes apart in the manifest."""
    first_line = next(iter(str(error).splitlines()), "")
    return f"{type(error).__name__}: {first_line[:200]}".rstrip(": ")


def cause_of(reason: str) -> Cause:
    """The cause behind a reason the manifest recorded; anything unrecognised is a crash."""
    if reason == FINISHED:
        return Cause.FINISHED
    if reason == CANCELLED:
        return Cause.CANCELLED
    if reason == DRIVER_STOPPED:
        return Cause.DRIVER_STOPPED
    if reason == NODE_RESTARTED:
        return Cause.LOST_NODE
    if reason.startswith(_INPUT_ERROR):
        return Cause.INPUT_ERROR
    if _LOST_ISLAND.fullmatch(reason):
        return Cause.LOST_ISLAND
    if _UNFIT_ISLAND.fullmatch(reason):
        return Cause.UNFIT_ISLAND
    return Cause.CRASH


@dataclass(frozen=True)
class EndedAttempt:
    """Why an attempt ended, and why the same expert's earlier attempts did."""
    cause: Cause
    earlier: Sequence[Cause] = ()


@dataclass(frozen=True)
class FailurePolicy:
    max_retries: int  # crashes an expert may recover from; the next one fails it
    abort_on_failure: bool = False  # an expert that fails stops the run (else the others go on)

    @staticmethod
    def uses_retry(cause: Cause) -> bool:
        return cause is Cause.CRASH

    def decide(self, ended: EndedAttempt) -> FailureDecision:
        cause = ended.cause
        if cause is Cause.FINISHED:
            raise ValueError("a finished attempt needs no decision")
        if cause is Cause.INPUT_ERROR:
            return FailureDecision.ABORT_RUN
        if cause in (Cause.LOST_ISLAND, Cause.UNFIT_ISLAND):
            return FailureDecision.MOVE
        if not self.uses_retry(cause):  # cancelled, driver stopped, node restarted: resume
            return FailureDecision.RESTART
        crashes = 1 + sum(1 for earlier in ended.earlier if self.uses_retry(earlier))
        if crashes <= self.max_retries:
            return FailureDecision.RESTART
        return FailureDecision.ABORT_RUN if self.abort_on_failure else FailureDecision.FAIL_EXPERT
