"""The no-grad backbone passes whose results are cached: pooled features and prefix states.

- ``compute_pooled``: pooled features ``[N, H]`` of a fully frozen backbone. Training then runs
  only the head, ``model.classify(features)``.
- ``compute_prefix``: the hidden states *entering* the first trainable block (the output of the
  embeddings and the frozen blocks before it), stored without padding as one flat
  ``[total_tokens, H]`` tensor plus offsets and lengths. Each training step rebuilds a padded
  batch with ``PrefixStates.batch`` and runs only the trainable blocks, the final norm and the
  pooling with ``mycelium.model.suffix.suffix_encode``, which reproduces ``Classifier.encode``
  exactly (same attention masks, same rotary position embeddings, gradients through the
  trainable blocks).

Both passes run the model in eval mode under ``torch.inference_mode`` over length-bucketed
batches (``text.length_buckets``), so the cost is close to one forward pass over the real tokens;
on a CPU two batches run at a time (``for_each_batch``). Results come back in the input order as
ordinary tensors (not inference tensors), usable in autograd afterwards.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from mycelium.distributed import World
from mycelium.model.blocks import ModesSaved, compute_dtype, model_device, transformer_blocks
from mycelium.model.classifier import Classifier
from mycelium.model.suffix import suffix_encode, supports_suffix
from mycelium.text import length_buckets, pad_batch

log = logging.getLogger(__name__)


def _check_lengths(token_ids: Sequence[Sequence[int]]) -> list[int]:
    lengths = [len(s) for s in token_ids]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} input(s) have no tokens (first at index {empty[0]}); every text must keep at least one token"
        )
    return lengths




def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


_T = TypeVar("_T")


def for_each_batch(batches: Sequence[list[int]], fn: Callable[[list[int]], _T], device: torch.device) -> Iterator[_T]:
    """``fn(batch)`` for every batch of a no-grad pass, results in batch order.

    On a CPU with two or more intra-op threads, two batches run side by side with half of the
    threads each. A forward pass over a couple of thousand tokens is made of small ops, and the
    intra-op threads meet at a barrier after every one of them; two batches at once keep both
    cores busy in between (MiniLM over the bench's 8,056 C4 texts on a 2-core CPU, three
    alternating pairs: 27.8-30.2 s vs 31.9-36.9 s one batch at a time, and less CPU time: the
    threads spin less at barriers). torch releases the GIL inside every op, so
    Python threads are enough. On a GPU the batches run one after another on the caller's thread.

    ``fn`` runs on a worker thread: it enters its own ``inference_mode`` and autocast (both are
    per thread) and writes only its own rows.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(batches) < 2:
        yield from map(fn, batches)
        return
    torch.set_num_threads(threads // 2)  # read by each worker thread when it starts
    pool = ThreadPoolExecutor(2, thread_name_prefix="mycelium-pass")
    try:
        yield from pool.map(fn, batches)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, the batches not started never run
        torch.set_num_threads(threads)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", disable=not enabled, leave=False)


def compute_pooled(
    model: Classifier,
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    pad_side: str = "right",
    token_budget: int = 16384,
    max_batch: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    out_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Pooled backbone features ``[N, H]`` float32 for every input, in input order.

    One pass in eval mode under ``torch.inference_mode`` over length-bucketed batches of at most
    ``token_budget`` padded tokens and ``max_batch`` rows. ``device`` defaults to the model's
    device; ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the backbone under autocast.
    The result is an ordinary tensor on ``out_device`` that the head can train on.
    """
    lengths = _check_lengths(token_ids)
    device = torch.device(device) if device is not None else model_device(model)
    out = torch.empty((len(token_ids), model.hidden_size), dtype=torch.float32, device=out_device)
    batches = length_buckets(lengths, token_budget, max_batch)

    def run(batch: list[int]) -> int:
        ids, mask = pad_batch([token_ids[i] for i in batch], pad_id, pad_side)
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            feats = model.encode(ids.to(device), mask.to(device)).float()
        # Copied outside inference mode so `out` stays an ordinary tensor.
        out[torch.as_tensor(batch, device=out.device)] = feats.to(out.device)
        return len(batch)

    with ModesSaved(model), _progress(len(token_ids), "pooled features", progress) as bar:
        for done in for_each_batch(batches, run, device):
            bar.update(done)
    return out


def pooled_from_prefix(
    model: Classifier,
    prefix: "PrefixStates",
    *,
    pad_side: str = "right",
    token_budget: int = 16384,
    max_batch: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pooled features ``[N, H]`` from cached prefix states: only the blocks after the prefix run
    (``rows``: only those rows, ``[len(rows), H]`` in their order).

    With the prefix of the unfreeze fallback cached, the frozen attempt's features cost the last
    few blocks instead of a full pass, and the fallback reuses the prefix: one backbone pass serves
    both attempts.
    """
    device = torch.device(device) if device is not None else model_device(model)
    rows = list(range(len(prefix))) if rows is None else list(rows)
    lengths = prefix.lengths[torch.as_tensor(rows, dtype=torch.long)].tolist()
    out = torch.empty((len(rows), model.hidden_size), dtype=torch.float32)

    def run(batch: list[int]) -> int:
        hidden, mask = prefix.batch([rows[i] for i in batch], pad_side, device)
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            feats = suffix_encode(model, hidden, mask, prefix.first_trainable).float()
        out[torch.as_tensor(batch)] = feats.cpu()
        return len(batch)

    with ModesSaved(model), _progress(len(lengths), "pooled features (from prefix)", progress) as bar:
        # `done`, never `rows`: `run` reads the outer `rows` from worker threads while this loop goes on.
        for done in for_each_batch(length_buckets(lengths, token_budget, max_batch), run, device):
            bar.update(done)
    return out


@dataclass
class PrefixStates:
    """Hidden states entering block ``first_trainable``, unpadded: row ``i`` is
    ``hidden[offsets[i] : offsets[i] + lengths[i]]``."""

    hidden: torch.Tensor  # [total_tokens, H]
    offsets: torch.Tensor  # [N] int64
    lengths: torch.Tensor  # [N] int64
    first_trainable: int

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def total_tokens(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size() + 16 * len(self)

    def batch(
        self,
        indices: Sequence[int] | torch.Tensor,
        pad_side: str = "right",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` padded to their longest: ``(hidden [B, T, H], attention_mask [B, T] int64)``.

        Padding positions hold zeros (attention never reads them and pooling skips them).
        ``dtype`` casts the hidden states (default: the stored dtype); the gather runs where the
        states are stored and only the batch moves to ``device``.
        """
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
        store = self.hidden.device
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.lengths.device)
        lens = self.lengths[idx].to(store)
        starts = self.offsets[idx].to(store)
        T = int(lens.max()) if idx.numel() else 0
        pos = torch.arange(T, device=store).unsqueeze(0)  # [1, T]
        if pad_side == "right":
            valid = pos < lens.unsqueeze(1)
            src = starts.unsqueeze(1) + pos
        else:
            shift = (T - lens).unsqueeze(1)
            valid = pos >= shift
            src = starts.unsqueeze(1) + pos - shift
        src = torch.where(valid, src, torch.zeros_like(src))
        hidden = self.hidden.index_select(0, src.reshape(-1)).view(len(idx), T, self.hidden_size)
        hidden = hidden * valid.unsqueeze(-1).to(hidden.dtype)
        mask = valid.long()
        if dtype is not None:
            hidden = hidden.to(dtype)
        if device is not None:
            hidden, mask = hidden.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        return hidden, mask

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """For ``FeatureCache.save``."""
        return {
            "hidden": self.hidden.contiguous(),
            "offsets": self.offsets.contiguous(),
            "lengths": self.lengths.contiguous(),
            "first_trainable": torch.tensor([self.first_trainable], dtype=torch.long),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> PrefixStates:
        """Inverse of ``to_tensors`` (e.g. on what ``FeatureCache.load`` returned)."""
        return cls(
            hidden=tensors["hidden"],
            offsets=tensors["offsets"].long(),
            lengths=tensors["lengths"].long(),
            first_trainable=int(tensors["first_trainable"].reshape(-1)[0]),
        )


class _Stop(Exception):
    """Raised by a hook once the wanted hidden states are captured, to skip the rest of the forward."""


def compute_prefix(
    model: Classifier,
    token_ids: Sequence[Sequence[int]],
    first_trainable: int,
    *,
    pad_id: int,
    pad_side: str = "right",
    token_budget: int = 16384,
    max_batch: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    store_dtype: torch.dtype | None = None,
    store_device: torch.device | str = "cpu",
    progress: bool = True,
) -> PrefixStates:
    """Hidden states entering block ``first_trainable`` (embeddings + ``blocks[:first_trainable]``).

    ``first_trainable == num_blocks`` stores the output of the last block (before any final norm).
    The forward stops at that block, so the trainable blocks never run here. ``store_dtype``
    defaults to the backbone's parameter dtype (float32 on CPU); ``torch.bfloat16`` or
    ``torch.float16`` halves the memory at a small precision cost. Memory: ``prefix_bytes``.
    """
    blocks = transformer_blocks(model.backbone)
    n = len(blocks)
    if not 0 <= first_trainable <= n:
        raise ValueError(f"first_trainable must be in 0..{n}, got {first_trainable}")
    lengths = _check_lengths(token_ids)
    device = torch.device(device) if device is not None else model_device(model)
    store_dtype = store_dtype or compute_dtype(model)
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    offsets_t = _offsets(lengths_t)
    total = int(lengths_t.sum())
    flat = torch.empty((total, model.hidden_size), dtype=store_dtype, device=store_device)

    # Per thread: ``for_each_batch`` may run two batches at once, each on its own thread.
    local = threading.local()

    def pre_hook(module, args, kwargs):
        local.captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    def post_hook(module, args, kwargs, output):
        local.captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    if first_trainable < n:
        handle = blocks[first_trainable].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = blocks[n - 1].register_forward_hook(post_hook, with_kwargs=True)

    batches = length_buckets(lengths, token_budget, max_batch)

    def run(batch: list[int]) -> int:
        ids, mask = pad_batch([token_ids[i] for i in batch], pad_id, pad_side)
        mask = mask.to(device)
        local.captured = []
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            try:
                model.encode(ids.to(device), mask)
            except _Stop:
                pass
            if len(local.captured) != 1:
                raise RuntimeError(f"block {first_trainable} did not run during the forward pass")
            real = mask.bool()
            values = local.captured.pop()[real]  # [tokens, H], rows in batch order, positions in order
            starts = offsets_t[torch.as_tensor(batch)].to(device)
            dest = (starts.unsqueeze(1) + mask.long().cumsum(-1) - 1)[real]
        flat.index_copy_(0, dest.to(flat.device), values.to(device=flat.device, dtype=store_dtype))
        return len(batch)

    try:
        with ModesSaved(model), _progress(len(token_ids), f"prefix states (block {first_trainable})", progress) as bar:
            for done in for_each_batch(batches, run, device):
                bar.update(done)
    finally:
        handle.remove()
    return PrefixStates(hidden=flat, offsets=offsets_t, lengths=lengths_t, first_trainable=first_trainable)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Where each row starts in a flat ``[total_tokens, H]`` tensor of rows laid end to end."""
    offsets = torch.zeros_like(lengths)
    if len(lengths) > 1:
        offsets[1:] = lengths.cumsum(0)[:-1]
    return offsets


def place_states(states: PrefixStates, device: torch.device) -> PrefixStates:
    """Prefix states on ``device`` when it is a GPU with room for them (at most half its free
    memory), else where they are (host RAM).

    On the GPU each batch is gathered there: no host gather and copy per step, which otherwise
    costs about as much as the four trainable blocks' own forward and backward.
    """
    if device.type != "cuda" or states.hidden.device.type == "cuda":
        return states
    free, _ = torch.cuda.mem_get_info(device)
    if states.nbytes > free / 2:
        log.info("prefix states (%.1f GiB) stay in host RAM: more than half the GPU's free %.1f GiB",
                 states.nbytes / (1 << 30), free / (1 << 30))
        return states
    return PrefixStates(hidden=states.hidden.to(device), offsets=states.offsets, lengths=states.lengths,
                        first_trainable=states.first_trainable)


def shard_pass(world: World, lengths: Sequence[int], compute: Callable[[list[int]], torch.Tensor | PrefixStates]
               ) -> torch.Tensor | PrefixStates:
    """A no-grad pass shared out over the ranks: ``compute(rows)`` (pooled features ``[len(rows), H]``
    or their ``PrefixStates``) on this rank's rows, then every rank gets the result for all rows in
    input order. Rows are dealt longest first, so each rank gets about ``1/size`` of the tokens."""
    if world.size == 1:
        return compute(list(range(len(lengths))))
    mine = world.share(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    part = compute(mine)
    at = torch.as_tensor(mine, dtype=torch.long)
    if isinstance(part, PrefixStates):
        lengths_t = torch.as_tensor(list(lengths), dtype=torch.long)
        offsets = _offsets(lengths_t)
        # Where each of this rank's tokens goes in the whole flat tensor: its row's start + position.
        dest = torch.repeat_interleave(offsets[at], part.lengths) + torch.arange(part.total_tokens) \
            - torch.repeat_interleave(part.offsets, part.lengths)
        hidden = torch.zeros((int(lengths_t.sum()), part.hidden_size), dtype=part.hidden.dtype, device=part.hidden.device)
        hidden[dest.to(hidden.device)] = part.hidden
        return PrefixStates(world.sum(hidden), offsets, lengths_t, part.first_trainable)
    full = torch.zeros((len(lengths), part.shape[1]), dtype=part.dtype, device=part.device)
    full[at.to(part.device)] = part
    return world.sum(full)


def verify_suffix(
    model: Classifier,
    token_ids: Sequence[Sequence[int]],
    first_trainable: int,
    *,
    pad_id: int,
    pad_side: str = "right",
) -> float:
    """Max absolute difference between ``suffix_encode(compute_prefix(...))`` and ``model.encode``
    on ``token_ids`` (a handful of real inputs): a check before trusting the cache on a new backbone."""
    if not supports_suffix(model):
        return math.inf
    states = compute_prefix(model, token_ids, first_trainable, pad_id=pad_id, pad_side=pad_side, progress=False)
    ids, mask = pad_batch(token_ids, pad_id, pad_side)
    device = model_device(model)
    with ModesSaved(model), torch.no_grad():
        full = model.encode(ids.to(device), mask.to(device)).float()
        hidden, hmask = states.batch(list(range(len(token_ids))), pad_side, device)
        part = suffix_encode(model, hidden, hmask, first_trainable).float()
    return float((full - part).abs().max())
