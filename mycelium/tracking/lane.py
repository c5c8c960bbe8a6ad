"""The tracking thread: MLflow and S3 work for finished epochs runs beside the next epoch."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from mycelium.tracking.runs import TrackingError

log = logging.getLogger(__name__)


class Lane:
    """MLflow work of a training on a background thread, in submission order.

    An epoch's upload and registration (a second or more of requests) then overlaps the next
    epoch's training instead of stalling it. After a job fails, later jobs do not run (an epoch is
    never published after an earlier one that was not, so the resume state stays at the last
    registered epoch). ``check`` raises a failed job's error at the next epoch; ``drain`` waits
    for every job and raises the first error; ``close`` waits too, so the epochs already trained
    are published even when training stops with an error.

    Jobs wait while the lane is ``paused()`` (and, with ``paused=True``, until the first pause
    ends): the backbone pass runs alone. Python work on a second thread holds the GIL between the
    pass's many short torch calls; on a 2-core CPU that made the MiniLM pass 2-4x slower.
    """

    def __init__(self, paused: bool = False, explain=lambda error: error) -> None:
        """``explain``: turns a job's error into the one to report (``outage.resume_hint``), so that
        every job fails the same way: one message, never a raw traceback from the tracking thread."""
        from concurrent.futures import ThreadPoolExecutor

        self._explain = explain
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mycelium-tracking")
        self._futures: list = []
        self._failed: BaseException | None = None
        self._open = threading.Event()
        if not paused:
            self._open.set()

    def submit(self, fn, *args, **kwargs):
        def job():
            self._open.wait()
            if self._failed is not None:
                raise TrackingError(f"not run: an earlier tracking step failed ({self._failed})")
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported by check/drain, with the component that failed
                self._failed = self._explain(e)
                raise self._failed from e

        future = self._pool.submit(job)
        self._futures.append(future)
        return future

    @contextmanager
    def paused(self):
        """No job starts inside this block (a running one finishes)."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def check(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def drain(self, raise_errors: bool = True) -> None:
        self._open.set()
        for f in self._futures:
            error = f.exception()  # waits
            if error is not None:
                if raise_errors:
                    raise error
                log.warning("tracking thread: %s", error)

    def close(self) -> None:
        self._open.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

