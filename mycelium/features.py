"""Backbone feature caching: compute what the frozen part of the backbone produces once, reuse it.

The backbone is frozen for C4/C5 and mostly frozen for C6, so running it every epoch is waste
(DESIGN.md, "Speed"). Two things can be cached:

- ``compute_pooled``: pooled features ``[N, H]`` of a fully frozen backbone. Training then runs
  only the head, ``model.classify(features)``.
- ``compute_prefix``: the hidden states *entering* the first trainable block (the output of the
  embeddings and the frozen blocks before it), stored without padding as one flat
  ``[total_tokens, H]`` tensor plus offsets and lengths. Each training step rebuilds a padded
  batch with ``PrefixStates.batch`` and runs only the trainable blocks, the final norm and the
  pooling with ``suffix_encode``, which reproduces ``Classifier.encode`` exactly (same attention
  masks, same rotary position embeddings, gradients through the trainable blocks).

Both passes run the model in eval mode under ``torch.inference_mode`` over length-bucketed
batches (``text.length_buckets``), so the cost is close to one forward pass over the real tokens;
on a CPU two batches run at a time (``for_each_batch``).
Results come back in the input order as ordinary tensors (not inference tensors), usable in
autograd afterwards.

``FeatureCache`` keeps results on disk in safetensors (no pickle), keyed by a sha256 over
everything that changes them (backbone, revision, max length, pooling, separator, data
fingerprint, split, first trainable block, dtype, ...), and writes atomically (temp file + rename)
so concurrent or interrupted runs never leave a half-written entry.

``prefix_bytes`` / ``fits`` let the caller decide whether a prefix cache fits its memory budget;
when it does not, the caller runs the full forward every step and says so.

``suffix_encode`` supports rotary decoder-only backbones laid out like Qwen2 (``layers``,
``rotary_emb``, ``norm``: Qwen2, Qwen3, Llama, Mistral) and BERT-style encoders
(``embeddings`` + ``encoder.layer``: BERT, RoBERTa, MiniLM). ``supports_suffix`` says whether a
model is one of them; ``verify_suffix`` compares suffix and full forward on a few inputs, a cheap
check before a long run on an unfamiliar backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn

from mycelium.model import Classifier, _base, final_norm, last_positions, pool, transformer_blocks
from mycelium.text import length_buckets, pad_batch

log = logging.getLogger("mycelium.features")

# Bumped whenever what a cache entry holds or how it is computed changes: old entries stop matching.
CACHE_FORMAT = 1
_META_KEY = "mycelium"

_ROTARY_DECODERS = frozenset({"qwen2", "qwen3", "llama", "mistral"})
_BERT_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _compute_dtype(model: Classifier) -> torch.dtype:
    """The dtype of the residual stream in the full forward: the backbone's parameter dtype."""
    return next(model.backbone.parameters()).dtype


def _decoder_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # The same expression as Classifier.encode: a left-padded row sees the positions it would alone.
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _check_lengths(token_ids: Sequence[Sequence[int]]) -> list[int]:
    lengths = [len(s) for s in token_ids]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} input(s) have no tokens (first at index {empty[0]}); every text must keep at least one token"
        )
    return lengths


class _ModesSaved:
    """Put a module in eval mode for the duration, then restore every submodule's own mode."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode


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


# ---------------------------------------------------------------------------------------------
# Pooled features (fully frozen backbone)


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
    device = torch.device(device) if device is not None else _model_device(model)
    out = torch.empty((len(token_ids), model.hidden_size), dtype=torch.float32, device=out_device)
    batches = length_buckets(lengths, token_budget, max_batch)

    def run(batch: list[int]) -> int:
        ids, mask = pad_batch([token_ids[i] for i in batch], pad_id, pad_side)
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            feats = model.encode(ids.to(device), mask.to(device)).float()
        # Copied outside inference mode so `out` stays an ordinary tensor.
        out[torch.as_tensor(batch, device=out.device)] = feats.to(out.device)
        return len(batch)

    with _ModesSaved(model), _progress(len(token_ids), "pooled features", progress) as bar:
        for rows in for_each_batch(batches, run, device):
            bar.update(rows)
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
) -> torch.Tensor:
    """Pooled features ``[N, H]`` from cached prefix states: only the blocks after the prefix run.

    With the prefix of the unfreeze fallback cached, the frozen attempt's features cost the last
    few blocks instead of a full pass, and the fallback reuses the prefix: one backbone pass serves
    both attempts.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    lengths = prefix.lengths.tolist()
    out = torch.empty((len(lengths), model.hidden_size), dtype=torch.float32)

    def run(batch: list[int]) -> int:
        hidden, mask = prefix.batch(batch, pad_side, device)
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            feats = suffix_encode(model, hidden, mask, prefix.first_trainable).float()
        out[torch.as_tensor(batch)] = feats.cpu()
        return len(batch)

    with _ModesSaved(model), _progress(len(lengths), "pooled features (from prefix)", progress) as bar:
        for rows in for_each_batch(length_buckets(lengths, token_budget, max_batch), run, device):
            bar.update(rows)
    return out


# ---------------------------------------------------------------------------------------------
# Prefix states (partially unfrozen backbone)


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
    device = torch.device(device) if device is not None else _model_device(model)
    store_dtype = store_dtype or _compute_dtype(model)
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    offsets_t = torch.zeros_like(lengths_t)
    if len(lengths) > 1:
        offsets_t[1:] = lengths_t.cumsum(0)[:-1]
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
        with _ModesSaved(model), _progress(len(token_ids), f"prefix states (block {first_trainable})", progress) as bar:
            for rows in for_each_batch(batches, run, device):
                bar.update(rows)
    finally:
        handle.remove()
    return PrefixStates(hidden=flat, offsets=offsets_t, lengths=lengths_t, first_trainable=first_trainable)


# ---------------------------------------------------------------------------------------------
# Suffix: the trainable blocks, final norm and pooling


def _arch(model: Classifier) -> str:
    base = _base(model.backbone)
    if all(hasattr(base, a) for a in ("layers", "rotary_emb")) and model.decoder:
        return "rotary_decoder"
    if hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"):
        return "bert_encoder"
    return "unsupported"


def _standard_decoder_layer(model: Classifier, block: nn.Module) -> bool:
    """The pre-norm decoder layer that Qwen2, Qwen3, Llama and Mistral share:
    ``x + self_attn(input_layernorm(x))``, then ``+ mlp(post_attention_layernorm(.))``."""
    return getattr(_base(model.backbone).config, "model_type", "") in _ROTARY_DECODERS and all(
        isinstance(getattr(block, a, None), nn.Module) for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))


def _last_block_at_last_token(block: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, layer_mask,
                              position_embeddings, position_ids: torch.Tensor) -> torch.Tensor:
    """The last decoder block, computed only where ``last`` pooling reads it: ``[B, H]`` at each
    row's last real token.

    Attention still runs over every position (the last token's query reads all keys and values),
    but nothing after it mixes positions, so the residual add, the second norm and the MLP run
    on one token per row. The MLP is most of a block's work (about 85% of its matmuls at
    Qwen2.5-0.5B's shape, 80% at the bench's hidden-128 CPU model, where four trainable blocks
    then train about 15% faster), forward and backward, and the result is the same.
    """
    attn, _ = block.self_attn(hidden_states=block.input_layernorm(hidden), attention_mask=layer_mask,
                              position_ids=position_ids, past_key_values=None, position_embeddings=position_embeddings)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = last_positions(attention_mask)
    x = hidden[rows, last] + attn[rows, last]
    return x + block.mlp(block.post_attention_layernorm(x))


def supports_suffix(model: Classifier) -> bool:
    """True when ``suffix_encode`` knows how to run the model's blocks on cached hidden states."""
    return _arch(model) != "unsupported"


def suffix_encode(
    model: Classifier,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    first_trainable: int,
) -> torch.Tensor:
    """Pooled features ``[B, H]`` from hidden states entering block ``first_trainable``.

    Runs ``blocks[first_trainable:]``, the final norm (when the backbone has one) and the pooling,
    building the attention mask and rotary position embeddings the way the backbone's own forward
    does, so the result equals ``model.encode(input_ids, attention_mask)``. Runs under the
    caller's grad mode and autocast: gradients reach the trainable blocks. With
    ``first_trainable == num_blocks`` no block runs. Under ``last`` pooling the last block of a
    Qwen2-style decoder runs its MLP only at each row's last real token
    (``_last_block_at_last_token``): the same features for about one block less work.
    """
    backbone = model.backbone
    base = _base(backbone)
    blocks = transformer_blocks(backbone)
    n = len(blocks)
    if not 0 <= first_trainable <= n:
        raise ValueError(f"first_trainable must be in 0..{n}, got {first_trainable}")
    device = _model_device(model)
    hidden = hidden.to(device=device, dtype=_compute_dtype(model))
    attention_mask = attention_mask.to(device)
    arch = _arch(model)
    config = base.config
    pooled_tail = False  # the last block already left one row per input (``last`` pooling)

    if first_trainable < n:
        if arch == "rotary_decoder":
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            position_ids = _decoder_position_ids(attention_mask)
            mask_kwargs = {
                "config": config,
                "inputs_embeds": hidden,
                "attention_mask": attention_mask,
                "past_key_values": None,
                "position_ids": position_ids,
            }
            layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
            position_embeddings = base.rotary_emb(hidden, position_ids)
            pooled_tail = model.pooling == "last" and _standard_decoder_layer(model, blocks[n - 1])
            for i in range(first_trainable, n - 1 if pooled_tail else n):
                hidden = blocks[i](
                    hidden,
                    attention_mask=masks[layer_types[i]],
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    past_key_values=None,
                    use_cache=False,
                )
                if isinstance(hidden, tuple):  # older transformers returned (hidden, ...)
                    hidden = hidden[0]
            if pooled_tail:
                hidden = _last_block_at_last_token(blocks[n - 1], hidden, attention_mask, masks[layer_types[n - 1]],
                                                   position_embeddings, position_ids)
        elif arch == "bert_encoder":
            from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

            if getattr(config, "is_decoder", False):
                mask = create_causal_mask(
                    config=config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None
                )
            else:
                mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
            for i in range(first_trainable, n):
                hidden = blocks[i](hidden, mask)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
        else:
            raise NotImplementedError(
                f"suffix_encode does not support {type(backbone).__name__} "
                f"(model_type {getattr(config, 'model_type', '?')!r}); run the full forward instead"
            )

    norm = final_norm(backbone)
    if norm is not None:
        hidden = norm(hidden)
    return hidden if pooled_tail else pool(hidden, attention_mask, model.pooling)


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
    device = _model_device(model)
    with _ModesSaved(model), torch.no_grad():
        full = model.encode(ids.to(device), mask.to(device)).float()
        hidden, hmask = states.batch(list(range(len(token_ids))), pad_side, device)
        part = suffix_encode(model, hidden, hmask, first_trainable).float()
    return float((full - part).abs().max())


# ---------------------------------------------------------------------------------------------
# Memory budget


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def prefix_bytes(total_tokens: int, hidden: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of a prefix cache of ``total_tokens`` real tokens of width ``hidden`` in ``dtype``."""
    return int(total_tokens) * int(hidden) * torch.empty((), dtype=_dtype(dtype)).element_size()


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


# ---------------------------------------------------------------------------------------------
# On-disk cache


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
) -> torch.Tensor | PrefixStates:
    """Pooled features or prefix states for ``name`` (e.g. ``("pooled", "train")`` or
    ``("prefix", "train", 20)``), from ``cache`` when it holds them, else ``compute()``d and saved.

    The key is ``cache.key(**key_parts, entry=name)``; ``cache=None`` just computes.
    """
    if cache is None:
        return compute()
    key = cache.key(**key_parts, entry=list(name))
    hit = cache.load(key)
    if hit is not None:
        tensors, _ = hit
        if "hidden" in tensors:
            return PrefixStates.from_tensors(tensors)
        if "features" in tensors:
            return tensors["features"]
        log.warning("feature cache entry %s holds neither features nor prefix states; recomputing", key)
    value = compute()
    if isinstance(value, PrefixStates):
        meta = {"entry": list(name), "kind": "prefix", "rows": len(value), "tokens": value.total_tokens,
                "dtype": value.hidden.dtype, "first_trainable": value.first_trainable, **key_parts}
        cache.save(key, value.to_tensors(), meta)
    else:
        meta = {"entry": list(name), "kind": "pooled", "rows": int(value.shape[0]), "dtype": value.dtype, **key_parts}
        cache.save(key, {"features": value}, meta)
    return value
