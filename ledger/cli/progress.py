"""Progress bars for the long verbs (replay, verify, export, import): on a terminal only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

err_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``52,310 events/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "events") -> Iterator[Callable[[int | None], None]]:
    """A rich progress bar on stderr, shown only when stderr is a terminal; yields ``update(completed)``."""
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
               RateColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, disable=not err_console.is_terminal, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def update(completed: int | None) -> None:
            bar.update(task, completed=completed)

        yield update
