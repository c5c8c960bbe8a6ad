"""What the bench runner and its worker processes share: the job description and small helpers.

A ``Job`` is one contender's run of one configuration; the runner writes it as JSON, starts
``bench/worker.py`` on it in a fresh process (so peak memory is per run) and reads back a JSON
result. Nothing here imports torch, transformers or mlflow: the runner stays light.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONTENDERS = ("peer", "ours", "lower")


@dataclass
class Job:
    contender: str  # peer | ours | lower
    config: str  # c4-minilm | c6-qwen2 | ...
    task: str  # c4 | c6
    data: str  # s3://... prefix the three contenders read alike
    backbone: str  # "minilm" or a local model folder
    epochs: int
    batch_size: int
    max_length: int
    unfrozen_layers: int
    lr_head: float
    lr_backbone: float
    weight_decay: float
    class_weights: str
    weight_clip: float
    dropout: float
    seed: int
    val_fraction: float
    token_budget: int
    device: str  # cpu | cuda
    workdir: str  # scratch folder of this run (Trainer output_dir, MYCELIUM_STATE, ...)
    cache_dir: str  # MYCELIUM_CACHE of this run: fresh = cold caches; the previous one = a cache hit
    result: str  # where the worker writes its JSON result
    eval_batch_size: int = 0  # peer: per_device_eval_batch_size (0: batch_size)
    profile: bool = False  # ours: also write a cProfile dump to workdir/ours.prof
    inputs: str = ""  # record fields the model reads (-P inputs); "" = the task's default
    extra: dict = field(default_factory=dict)

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Job:
        return cls(**json.loads(Path(path).read_text()))


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_description() -> dict:
    """CPU model, cores, memory, torch/transformers versions and the GPU if any (imports torch)."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state ppid ... utime(12) stime(13) counting from state = 0.
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by the processes ``roots`` and all their live descendants
    (e.g. the MLflow server, its uvicorn workers and job runners, and SeaweedFS)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, [r for r in roots if r in stats], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), for the share other jobs took."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK
