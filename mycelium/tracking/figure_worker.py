"""PNG figures drawn in a helper process, so matplotlib never holds the training process's GIL.

The tracking thread logs a figure per epoch (confusion matrix) plus one before and one after
training. Drawing is pure Python (text layout, Agg) and holds the GIL, while every torch call
of the training thread releases and re-takes it; on a 2-core CPU a head-only epoch ran at half
speed or worse while a figure was being drawn (``bench/``). In a separate process the drawing
uses the other core and the training thread does not wait for it.

``png(kind, **kwargs)`` returns the PNG bytes of ``plots.<kind>_figure(**kwargs)``; the arguments
are plain JSON data (counts, confusion matrices, metric dicts). The helper starts on first use
(``python -m mycelium.figure_worker``, which imports only numpy and matplotlib) and stops with
``shutdown()`` or when this process exits. When it cannot start or dies, the figure is drawn
here instead and a warning says so: a figure is never lost to the helper.

Protocol on the helper's stdin/stdout: a request is a 4-byte big-endian length and that many
bytes of JSON ``{"kind": ..., "kwargs": {...}}``; a reply is one status byte (0 ok, 1 error), a
4-byte length, and the PNG bytes or a UTF-8 ``"ExceptionType: message"``.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("class_distribution", "confusion_matrix", "attempts")
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}


def render(kind: str, **kwargs) -> bytes:
    """PNG bytes of ``plots.<kind>_figure(**kwargs)``, drawn in this process."""
    from mycelium.tracking import figures as plots

    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}: choose one of {', '.join(KINDS)}")
    buf = io.BytesIO()
    getattr(plots, f"{kind}_figure")(**kwargs).savefig(buf, format="png")
    return buf.getvalue()


class FigureWorker:
    """A helper process that draws figures; ``png`` blocks only the calling thread while it works."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._broken = False

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._alive() else None

    def _start(self) -> subprocess.Popen:
        # The helper imports this package from where this process found it (a checkout need not be installed).
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        return subprocess.Popen([sys.executable, "-m", "mycelium.tracking.figure_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)

    def start(self) -> None:
        """Start the helper now (it imports matplotlib while the caller goes on); idempotent."""
        with self._lock:
            if not self._broken and not self._alive():
                try:
                    self._proc = self._start()
                except OSError as e:
                    self._broken = True
                    log.warning("figure helper process did not start (%s); drawing figures in the training process", e)

    def png(self, kind: str, **kwargs) -> bytes:
        """PNG bytes of the figure; bad arguments raise as ``render`` would (ValueError, ...)."""
        payload = json.dumps({"kind": kind, "kwargs": kwargs}).encode()
        with self._lock:
            if not self._broken:
                try:
                    if not self._alive():
                        self._proc = self._start()
                    self._proc.stdin.write(struct.pack(">I", len(payload)) + payload)
                    self._proc.stdin.flush()
                    status, size = struct.unpack(">BI", _read(self._proc.stdout, 5))
                    body = _read(self._proc.stdout, size)
                except (OSError, EOFError, struct.error) as e:
                    self._broken = True
                    log.warning("figure helper process failed (%s: %s); drawing figures in the training process",
                                type(e).__name__, e)
                    self._stop()
                else:
                    if status == 0:
                        return body
                    name, _, message = body.decode("utf-8", "replace").partition(": ")
                    raise _ERRORS.get(name, RuntimeError)(message if name in _ERRORS else f"{name}: {message}")
        return render(kind, **kwargs)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # EOF: the helper's loop ends
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def close(self) -> None:
        with self._lock:
            self._stop()


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"figure helper closed its output ({len(data)} of {n} bytes)")
    return data


_worker = FigureWorker()
atexit.register(_worker.close)


def png(kind: str, **kwargs) -> bytes:
    """PNG bytes of ``plots.<kind>_figure(**kwargs)``, drawn in the shared helper process."""
    return _worker.png(kind, **kwargs)


def start() -> None:
    """Start the shared helper ahead of its first figure (see ``FigureWorker.start``)."""
    _worker.start()


def shutdown() -> None:
    """Stop the shared helper (a later ``png`` starts a new one)."""
    _worker.close()


def _serve() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries replies only: a stray print must not corrupt one
    from matplotlib.figure import Figure  # noqa: F401 - the slow import, done before the first request arrives

    from mycelium.tracking import figures as plots  # noqa: F401
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return  # the training process closed the pipe or exited
        request = json.loads(_read(stdin, struct.unpack(">I", head)[0]))
        try:
            status, body = 0, render(request["kind"], **request["kwargs"])
        except Exception as e:  # noqa: BLE001 - reported to the caller, which raises it
            status, body = 1, f"{type(e).__name__}: {e}".encode()
        stdout.write(struct.pack(">BI", status, len(body)) + body)
        stdout.flush()


if __name__ == "__main__":
    _serve()
