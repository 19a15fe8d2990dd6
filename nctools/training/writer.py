"""`BackgroundWriter`: a run's per-epoch files written while the next epoch trains.

Usage::

    writer = BackgroundWriter()
    for epoch in epochs:
        train_one_epoch()
        writer.wait()                       # the previous epoch's files are on disk
        data = serialise_now()              # bytes: later training cannot change them
        writer.submit(lambda: write(data))  # fsyncs overlap the next epoch
    writer.wait()                           # before the run reports itself done

The jobs of one ``submit`` run in order on one thread; after a failure the rest are
skipped (a checkpoint is never written past a history row that failed), and the error
is raised by the next ``wait`` or ``submit``. A process killed meanwhile loses at most
the files of the last epoch, each whole or absent (every write is atomic), so a resumed
run repeats that epoch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundWriter:
    """At most one batch of write jobs in flight, on a worker thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, *jobs: Callable[[], None]) -> None:
        """Wait for the previous batch, then start running ``jobs`` in order."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(jobs,), name="nctools-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the jobs submitted so far are done; re-raise their first error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the jobs without raising: for cleanup while another error is on its
        way out (the writer's own error, if any, is logged)."""
        try:
            self.wait()
        except BaseException as exc:
            log.error("a background write failed too: %s", exc)

    def _run(self, jobs: tuple[Callable[[], None], ...]) -> None:
        try:
            for job in jobs:
                job()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc
