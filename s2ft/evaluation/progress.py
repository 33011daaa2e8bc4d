"""A rich progress bar for long evaluations, one line per task; a silent stand-in when disabled."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TaskBar:
    """Hands out per-task progress lines from a `rich.progress.Progress` (or nothing, when it is None)."""

    def __init__(self, progress: Progress | None):
        self.progress = progress

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(count)`` for a task of ``total`` steps."""
        if self.progress is None:
            yield lambda count: None
            return
        task_id = self.progress.add_task(name, total=total)
        yield lambda count: self.progress.advance(task_id, count)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[TaskBar]:
    """A `TaskBar` showing a live rich progress display when ``enabled``, silent otherwise."""
    if not enabled:
        yield TaskBar(None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        yield TaskBar(progress)
