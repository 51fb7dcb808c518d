"""The run's progress bar (rich): requests finished of those planned, in flight, errors, retries."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from extproc.lab.runner.records import RequestResult


class RichProgress:
    """A rich progress bar fed by the driver (:class:`extproc.lab.runner.driver.Progress`).

    Use as a context manager around :func:`extproc.lab.runner.driver.drive`.
    """

    def __init__(self, total: int, description: str, console: Console | None = None):
        self.total = total
        self.description = description
        self.in_flight = self.errors = self.retries = 0
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"), console=console, transient=False,
        )
        self._task = None

    def __enter__(self) -> "RichProgress":
        self._progress.__enter__()
        self._task = self._progress.add_task(self.description, total=self.total, stats=self._stats())
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def _stats(self) -> str:
        return f"in flight {self.in_flight}  errors {self.errors}  retries {self.retries}"

    def started(self, result: RequestResult) -> None:
        self.in_flight += 1
        self._progress.update(self._task, stats=self._stats())

    def finished(self, result: RequestResult) -> None:
        self.in_flight -= 1
        self.retries += result.retries
        self.errors += result.outcome == "error"
        self._progress.update(self._task, advance=1, stats=self._stats())
