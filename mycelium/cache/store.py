"""The on-disk feature cache and the memory budget of a prefix cache.

``FeatureCache`` keeps results on disk in safetensors (no pickle), keyed by a sha256 over
everything that changes them (backbone, revision, max length, pooling, separator, data
fingerprint, split, first trainable block, dtype, ...), and writes atomically (temp file + rename)
so concurrent or interrupted runs never leave a half-written entry.

``prefix_bytes`` / ``fits`` let the caller decide whether a prefix cache fits its memory budget;
when it does not, the caller runs the full forward every step and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mycelium.cache.passes import PrefixStates
from mycelium.distributed import SOLO, World
from mycelium.model.blocks import as_dtype

log = logging.getLogger(__name__)

# Bumped whenever what a cache entry holds or how it is computed changes: old entries stop matching.
CACHE_FORMAT = 1


_META_KEY = "mycelium"


def prefix_bytes(total_tokens: int, hidden: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of a prefix cache of ``total_tokens`` real tokens of width ``hidden`` in ``dtype``."""
    return int(total_tokens) * int(hidden) * torch.empty((), dtype=as_dtype(dtype)).element_size()


def fits(nbytes: int, budget_gb: float) -> bool:
    """True when ``nbytes`` fit in ``budget_gb`` GiB (2**30 bytes)."""
    return nbytes <= budget_gb * (1 << 30)


def available_ram_bytes() -> int:
    """Memory the kernel says a new allocation can take without swapping (``MemAvailable``).

    Read from ``/proc/meminfo`` because neither torch nor the standard library reports it; elsewhere
    the free pages from ``sysconf``.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_cache_budget_gb() -> float:
    """``cache_memory_gb=0`` (auto): half the RAM available now, leaving the rest to the data,
    the backbone and everything else on the machine."""
    return available_ram_bytes() / 2 / (1 << 30)


def default_cache_root() -> Path:
    """``$MYCELIUM_CACHE/features``, else ``~/.cache/mycelium/features``."""
    base = os.environ.get("MYCELIUM_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mycelium") / "features"


def _canonical(value):
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=repr)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)  # Path, enums, ...


class FeatureCache:
    """Cached tensors on disk, one safetensors file per key under ``root``.

    ``key(**parts)`` hashes everything that determines the features; pass at least the backbone
    name and revision, max length, pooling, separator, data fingerprint, split, kind
    (``pooled``/``prefix``), first trainable block and dtype.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    @staticmethod
    def key(**parts) -> str:
        payload = json.dumps({"format": CACHE_FORMAT, **_canonical(parts)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, meta)`` for ``key``, or None (logged as a miss). An unreadable entry is a miss."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            log.info("feature cache miss %s", key)
            return None
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
            log.warning("feature cache entry %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
            log.info("feature cache miss %s", key)
            return None
        log.info("feature cache hit %s", key)
        return tensors, meta

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Write atomically: a temp file in the same folder, then rename over the final name."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
            save_file(plain, tmp, metadata={_META_KEY: json.dumps(_canonical(meta or {}), sort_keys=True)})
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("feature cache saved %s (%.1f MiB)", key, final.stat().st_size / (1 << 20))
        return final

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], dict[str, torch.Tensor]],
        meta: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tensors for ``key`` from disk, else ``compute()`` them, save and return them."""
        hit = self.load(key)
        if hit is not None:
            return hit[0]
        tensors = compute()
        self.save(key, tensors, meta)
        return tensors


def cached_compute(
    cache: FeatureCache | None,
    name: Sequence,
    key_parts: dict,
    compute: Callable[[], torch.Tensor | PrefixStates],
    world: World = SOLO,
) -> torch.Tensor | PrefixStates:
    """Pooled features or prefix states for ``name`` (e.g. ``("pooled", "train")`` or
    ``("prefix", "train", 20)``), from ``cache`` when it holds them, else ``compute()``d and saved.

    The key is ``cache.key(**key_parts, entry=name)``; ``cache=None`` just computes. Under data
    parallelism ``compute`` is collective, so the entry is used only when every rank finds it
    (nodes have disks of their own), else every rank computes; rank 0 alone writes it.
    """
    value = None
    if cache is not None:
        key = cache.key(**key_parts, entry=list(name))
        hit = cache.load(key)
        if hit is not None:
            tensors, _ = hit
            if "hidden" in tensors:
                value = PrefixStates.from_tensors(tensors)
            elif "features" in tensors:
                value = tensors["features"]
            else:
                log.warning("feature cache entry %s holds neither features nor prefix states; recomputing", key)
    if world.all(value is not None):
        return value
    value = compute()
    if cache is not None and world.main:
        if isinstance(value, PrefixStates):
            meta = {"entry": list(name), "kind": "prefix", "rows": len(value), "tokens": value.total_tokens,
                    "dtype": value.hidden.dtype, "first_trainable": value.first_trainable, **key_parts}
            cache.save(key, value.to_tensors(), meta)
        else:
            meta = {"entry": list(name), "kind": "pooled", "rows": int(value.shape[0]), "dtype": value.dtype, **key_parts}
            cache.save(key, {"features": value}, meta)
    return value
