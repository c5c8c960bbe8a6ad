"""CPU-only tuning, decided once per device: on a GPU every context here does nothing.

What each setting buys is measured in bench/ (bench/README.md, "What each speed-up buys"); a
setting stays only while the bench shows it pays.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_tuning(device: torch.device) -> Iterator[None]:
    """Entered once around a whole training. On a CPU, CPython hands the GIL between the training
    thread and the tracking thread every 0.1 ms instead of 5 ms: the training thread makes many
    short torch calls and otherwise waits up to 5 ms after each one."""
    if device.type != "cpu":
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, 0.0001))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextmanager
def head_only_threads(device: torch.device, head_only: bool) -> Iterator[None]:
    """Epochs that train only a head on cached features run on one intra-op thread on a CPU: its
    tiny matmuls lose more to thread synchronisation than a second thread gives."""
    if device.type != "cpu" or not head_only:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
