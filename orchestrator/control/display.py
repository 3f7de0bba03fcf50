"""The live view of the experts stage: a rich progress bar per expert (at most MAX_BARS,
then one line counting the others by state), or, where output is not a terminal (CI,
nohup, a background driver's driver.log), where rich would show nothing until the end, a
plain line per expert every few seconds and one per event. It shows what the controller
tells it and keeps nothing the controller decides by."""

from __future__ import annotations

import datetime
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# A redraw costs about half a millisecond of the driver's CPU per bar: bars for all of 256
# experts (which no terminal shows) took a quarter of a core at 4 redraws a second.
MAX_BARS = 10
REFRESH_PER_SECOND = 1
# Which experts get the bars: those that need a look first, then the ones training.
SHOWN_FIRST = {"failed": 0, "starting": 1, "running": 2, "queued": 3, "done": 4}


def expert_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _label(expert: int, island: str) -> str:
    name = "seed" if expert < 0 else f"expert {expert}"
    return f"{name}@{island}"


class ExpertsDisplay:
    """One bar per expert: its island, steps done of its total, and a status line."""

    def __init__(self, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.progress = expert_progress()
        self.bars: dict[int, TaskID] = {}
        self.every = every  # seconds between two plain lines of one expert
        self.clock = clock
        self.plain: Console | None = None  # set while lines replace the live bars
        self.printed: dict[int, float] = {}  # when each expert's last progress line was
        self.states: dict[int, str] = {}  # as shown: a key of SHOWN_FIRST

    def add(self, expert: int, island: str, total: int, completed: int) -> None:
        self.bars[expert] = self.progress.add_task(
            _label(expert, island), total=total, status="queued", completed=completed)
        self.states[expert] = "queued"

    def moved(self, expert: int, island: str) -> None:
        self.progress.update(self.bars[expert], description=_label(expert, island))
        self._say(expert, f"moved to island {island}")

    def starting(self, expert: int) -> None:
        self.progress.update(self.bars[expert], status="starting")
        self.states[expert] = "starting"
        self._say(expert, "starting")

    def reported(self, expert: int, step: int, loss: float, samples_per_s: float) -> None:
        status = (f"loss {loss:.4f} {samples_per_s:.0f}/s" if samples_per_s
                  else f"starting at step {step}")
        self.progress.update(self.bars[expert], completed=step, status=status)
        self.states[expert] = "running"
        if self.plain is None or self.clock() - self.printed.get(expert, -1e9) < self.every:
            return
        task = self.progress.tasks[self.bars[expert]]
        line = f"step {step}/{task.total:.0f}"
        if samples_per_s:
            line += f", loss {loss:.4f}, {samples_per_s:.1f} samples/s"
            if task.time_remaining is not None:
                line += f", ETA {datetime.timedelta(seconds=round(task.time_remaining))}"
        self.printed[expert] = self.clock()
        self._say(expert, line)

    def failed(self, expert: int, attempt: int, reason: str) -> None:
        self.progress.update(self.bars[expert],
                             status=f"[red]attempt {attempt} failed: {reason[:50]}")
        self.states[expert] = "failed"
        self._say(expert, f"attempt {attempt} failed: {reason}")

    def done(self, expert: int, steps: int, loss: float) -> None:
        self.progress.update(self.bars[expert], completed=steps,
                             status=f"[green]done, loss {loss:.4f}")
        self.states[expert] = "done"
        self._say(expert, f"done at step {steps}, loss {loss:.4f}")

    def _say(self, expert: int, text: str) -> None:
        """One plain line about an expert, when lines replace the bars."""
        if self.plain is None:
            return
        description = self.progress.tasks[self.bars[expert]].description
        self.plain.print(f"{description}: {text}", markup=False, highlight=False,
                         soft_wrap=True)

    def view(self) -> Group:
        """The bars of at most MAX_BARS experts (SHOWN_FIRST decides which), and a line
        counting every expert by state when some have no bar."""
        order = sorted(self.bars, key=lambda k: (SHOWN_FIRST[self.states[k]], k))
        shown = set(order[:MAX_BARS])
        for expert, task in self.bars.items():
            visible = expert in shown
            if self.progress.tasks[task].visible != visible:
                self.progress.update(task, visible=visible)
        if len(order) <= MAX_BARS:
            return Group(self.progress)
        counts = Counter(self.states.values())
        states = ", ".join(f"{counts[state]} {state}" for state in SHOWN_FIRST if counts[state])
        return Group(self.progress, Text(f"{len(order)} experts: {states} "
                                         f"({len(order) - MAX_BARS} without a bar)"))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.view()

    @contextmanager
    def live(self, console: Console) -> Iterator[None]:
        """The bars redrawn once a second while the body runs; once more at its end. On
        anything but a terminal, plain lines instead."""
        if not console.is_terminal:
            self.plain = console
            try:
                yield
            finally:
                self.plain = None
            return
        with Live(self, console=console, refresh_per_second=REFRESH_PER_SECOND) as live:
            yield
            live.refresh()
