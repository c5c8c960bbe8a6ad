"""Data parallelism on torchrun: which process this is, how it is launched, and the few
collectives the training needs.

Under ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``) every rank runs the
same training. Rank 0 alone reads the data, talks to MLflow and S3 and makes every decision
(attempts, early stopping, the champion); the other ranks follow its announcements
(``mycelium.train.collective.follow``). One process is a world of one, where every collective below returns
at once: the training code has a single path.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training (``size == 1``: a plain process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[_T]) -> list[_T]:
        """This rank's share of ``items`` (rows or batches): every ``size``-th one from ``rank``;
        over all ranks each item once, with no padding duplicates."""
        return list(items[self.rank :: self.size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (every rank gets the sum); the input when alone."""
        if self.size == 1:
            return tensor
        out = tensor.to(self._comm_device() or tensor.device).contiguous()
        dist.all_reduce(out)
        return out.to(tensor.device)

    def all(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank: ranks agree before a step that is collective."""
        return bool(self.sum(torch.tensor([0 if flag else 1])).item() == 0)

    def broadcast(self, value: _T | None = None) -> _T:
        """Rank 0's ``value`` on every rank (a picklable object: announcements, records)."""
        if self.size == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def _comm_device(self) -> torch.device | None:
        """Where collectives need their tensors: this rank's GPU under NCCL (it reduces GPU tensors
        only); None under gloo, which takes them where they are."""
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else None


SOLO = World()


def launched_world() -> World | None:
    """The world a torchrun-style launcher started this process in, or None (not launched).
    ``LOCAL_RANK`` may be missing where each node runs one process (e.g. a PyTorchJob without torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def start(device_kind: str, timeout_seconds: float) -> World:
    """Join the process group when launched by torchrun: NCCL on GPUs, gloo on CPUs. A collective
    that waits longer than ``timeout_seconds`` (a rank died, a node is gone) fails on every rank
    instead of hanging."""
    world = launched_world()
    if world is None or world.size == 1:
        return world or SOLO
    _end_with_launcher()
    if device_kind == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    return world


def _end_with_launcher() -> None:
    """This rank gets SIGKILL when the process that launched it dies (Linux). torchrun starts ranks in
    sessions of their own, so a kill -9 of the launcher would leave them training, and rank 0
    registering, unseen."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def nproc(value: str, device: str = "auto") -> int:
    """``nproc_per_node``: a number, or ``auto`` = every visible GPU (one process on a CPU). On GPUs
    each process takes one, so a number above the GPUs visible is refused (ValueError)."""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    n = max(gpus, 1) if value == "auto" else int(value)
    if gpus and n > gpus:
        raise ValueError(f"parameter nproc_per_node={value}: this machine shows {gpus} GPU(s) and each process needs one "
                         f"(use -P nproc_per_node=auto, or -P device=cpu for gloo processes on the CPU)")
    return n


def relaunch(n: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` as ``n`` processes on this machine, as ``torchrun --standalone
    --nproc-per-node n`` does (its own code, in this process), and return the exit status of the
    first rank that failed (0 when all succeeded). The ranks inherit this environment, ``MLFLOW_RUN_ID``
    from ``mlflow run`` included: rank 0 takes it over."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's default is one thread per process; on a CPU the cores are shared out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log.info("launching %d processes: torchrun --standalone --nproc-per-node=%d -m %s ...", n, n, module)
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "-m", module, *argv]))
    except ChildFailedError as e:  # the failing ranks have said why; rank 0's exit status (else the first's) is the launcher's
        failure = e.failures.get(0) or e.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
