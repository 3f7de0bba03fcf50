"""Unit tests of the failure policy (orchestrator/control/failure_policy.py): decisions by
cause, retries used only by crashes, reasons that read back as their causes."""

from __future__ import annotations

import pytest

from orchestrator.control.failure_policy import (
    CANCELLED,
    DRIVER_STOPPED,
    FINISHED,
    NODE_RESTARTED,
    Cause,
    EndedAttempt,
    FailureDecision,
    FailurePolicy,
    cause_of,
    crash_reason,
    input_error_reason,
    lost_island_reason,
    unfit_island,
    unfit_island_reason,
)
from runstore.errors import InputError

CRASH, LOST = Cause.CRASH, Cause.LOST_ISLAND


def test_crashes_restart_until_the_retries_are_used_up():
    policy = FailurePolicy(max_retries=2)
    assert policy.decide(EndedAttempt(CRASH)) is FailureDecision.RESTART
    assert policy.decide(EndedAttempt(CRASH, [CRASH])) is FailureDecision.RESTART
    assert policy.decide(EndedAttempt(CRASH, [CRASH, CRASH])) is FailureDecision.FAIL_EXPERT


def test_no_retries_fails_the_first_crash():
    assert FailurePolicy(0).decide(EndedAttempt(CRASH)) is FailureDecision.FAIL_EXPERT


@pytest.mark.parametrize("free", [Cause.LOST_ISLAND, Cause.CANCELLED, Cause.DRIVER_STOPPED,
                                  Cause.FINISHED, Cause.INPUT_ERROR, Cause.LOST_NODE])
def test_only_crashes_use_up_a_retry(free):
    policy = FailurePolicy(max_retries=1)
    assert policy.decide(EndedAttempt(CRASH, [free] * 5)) is FailureDecision.RESTART
    assert policy.decide(EndedAttempt(CRASH, [free, CRASH, free])) is \
        FailureDecision.FAIL_EXPERT


def test_lost_island_moves_even_when_the_retries_are_used_up():
    policy = FailurePolicy(max_retries=0)
    assert policy.decide(EndedAttempt(LOST)) is FailureDecision.MOVE
    assert policy.decide(EndedAttempt(LOST, [CRASH, LOST, CRASH])) is FailureDecision.MOVE


def test_cancel_and_stopped_driver_restart_without_a_retry():
    policy = FailurePolicy(max_retries=0)
    for cause in (Cause.CANCELLED, Cause.DRIVER_STOPPED):
        assert policy.decide(EndedAttempt(cause, [CRASH, CRASH])) is FailureDecision.RESTART


def test_input_error_aborts_the_run():
    assert FailurePolicy(5).decide(EndedAttempt(Cause.INPUT_ERROR)) is FailureDecision.ABORT_RUN


def test_a_finished_attempt_needs_no_decision():
    with pytest.raises(ValueError):
        FailurePolicy(2).decide(EndedAttempt(Cause.FINISHED))


def test_reasons_read_back_as_their_causes():
    assert cause_of(FINISHED) is Cause.FINISHED
    assert cause_of(CANCELLED) is Cause.CANCELLED
    assert cause_of(DRIVER_STOPPED) is Cause.DRIVER_STOPPED
    assert cause_of(NODE_RESTARTED) is Cause.LOST_NODE
    assert cause_of(lost_island_reason("gpu-a.1")) is Cause.LOST_ISLAND
    assert lost_island_reason("beta") == "island beta left the cluster"
    bad = InputError("shards/3.parquet", "not a parquet file")
    assert input_error_reason(bad) == "input error: shards/3.parquet: not a parquet file"
    assert cause_of(input_error_reason(bad)) is Cause.INPUT_ERROR
    assert cause_of(crash_reason(RuntimeError("island beta left the cluster"))) is CRASH
    assert cause_of(crash_reason(MemoryError())) is CRASH


def test_crash_reason_is_the_type_and_first_line():
    assert crash_reason(ValueError("bad shape\nTraceback ...")) == "ValueError: bad shape"
    assert crash_reason(MemoryError()) == "MemoryError"
    assert crash_reason(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200


def test_an_unfit_island_moves_the_expert_and_abort_turns_a_failed_expert_into_a_stop():
    policy = FailurePolicy(max_retries=0, abort_on_failure=True)
    assert policy.decide(EndedAttempt(Cause.UNFIT_ISLAND, [CRASH])) is FailureDecision.MOVE
    assert policy.decide(EndedAttempt(CRASH)) is FailureDecision.ABORT_RUN
    assert FailurePolicy(0).decide(EndedAttempt(CRASH)) is FailureDecision.FAIL_EXPERT
    reason = unfit_island_reason("gpu-a", InputError("islands.pool[gpu-a].memory_gb", "0.1"))
    assert cause_of(reason) is Cause.UNFIT_ISLAND
    assert unfit_island("islands.pool[gpu-a].memory_gb") == "gpu-a"
    assert unfit_island("experts.model") is None
