"""The experts' display where output is not a terminal (CI, nohup, driver.log): plain lines,
one per expert every few seconds and one per event, instead of bars shown only at the end."""

from __future__ import annotations

import io

from rich.console import Console

from orchestrator.control.display import ExpertsDisplay


def test_plain_progress_lines_when_output_is_not_a_terminal():
    now = [0.0]
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    display = ExpertsDisplay(every=5.0, clock=lambda: now[0])
    display.add(0, "local-0", total=800, completed=0)
    display.add(1, "local-1", total=600, completed=0)
    with display.live(console):
        display.starting(0)
        display.reported(0, 100, 0.51234, 480.0)
        display.reported(1, 50, 0.7, 250.0)
        now[0] = 2.0
        display.reported(0, 120, 0.5, 470.0)  # within 5 s of its last line: not printed
        now[0] = 6.0
        display.reported(0, 200, 0.4321, 460.0)
        display.failed(1, 1, "FloatingPointError: non-finite loss at step 60")
        display.done(0, 800, 0.25)
    lines = out.getvalue().splitlines()
    assert lines[0] == "expert 0@local-0: starting"
    assert lines[1].startswith("expert 0@local-0: step 100/800, loss 0.5123, 480.0 samples/s")
    assert lines[2].startswith("expert 1@local-1: step 50/600, loss 0.7000, 250.0 samples/s")
    assert lines[3].startswith("expert 0@local-0: step 200/800, loss 0.4321, 460.0 samples/s")
    assert lines[4:] == [
        "expert 1@local-1: attempt 1 failed: FloatingPointError: non-finite loss at step 60",
        "expert 0@local-0: done at step 800, loss 0.2500"]


def test_a_terminal_gets_the_live_bars_and_no_plain_lines():
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True)
    display = ExpertsDisplay(every=0.0)
    display.add(0, "local-0", total=10, completed=0)
    with display.live(console):
        display.reported(0, 5, 0.5, 100.0)
    assert "expert 0@local-0: step" not in out.getvalue()
    assert "expert 0@local-0" in out.getvalue()  # the bar


def test_many_experts_get_a_bounded_number_of_bars_and_a_count_of_the_rest():
    from orchestrator.control.display import MAX_BARS

    display = ExpertsDisplay()
    experts = MAX_BARS + 20
    for expert in range(experts):
        display.add(expert, f"island-{expert % 4}", total=10, completed=0)
    for expert in range(MAX_BARS + 10):
        display.reported(expert, 5, 0.5, 100.0)
    display.failed(MAX_BARS + 5, 1, "worker died")
    display.done(0, 10, 0.25)
    out = io.StringIO()
    Console(file=out, width=200).print(display.view())
    lines = out.getvalue().splitlines()
    bars = [line.split("@")[0] for line in lines if "@island-" in line]
    # The failed expert first, then the running ones by number; the done and queued wait.
    assert bars == [f"expert {k}" for k in sorted([MAX_BARS + 5, *range(1, MAX_BARS)])]
    assert lines[-1] == (f"{experts} experts: 1 failed, {MAX_BARS + 8} running, 10 queued, "
                         f"1 done (20 without a bar)")


def test_the_status_table_folds_the_last_reason_within_80_columns():
    from orchestrator.cli.status import ExpertsTable

    out = io.StringIO()
    reason = "crash: RuntimeError: worker died because its node ran out of memory at step 11"
    rows = [("0", "local-0", "pending", "10/30", "0.5000", "120", "00:00:03", "2", reason),
            ("seed", "local-1", "done", "30/30", "-", "-", "-", "1", "finished")]
    Console(file=out, width=80).print(ExpertsTable(rows))
    lines = out.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert lines[1].split() == ["expert", "island", "state", "step", "loss", "samp/s", "ETA",
                                "tries", "last", "reason"]
    assert " ".join(" ".join(lines[3:-1]).split()).endswith(reason)
    assert lines[-1].split() == ["seed", "local-1", "done", "30/30", "-", "-", "-", "1",
                                 "finished"]
