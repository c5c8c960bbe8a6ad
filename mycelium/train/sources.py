"""What one epoch iterates over: cached pooled features, cached prefix states, or token ids; the
``Source`` constructor is the one place that picks."""

from __future__ import annotations

import logging

import torch

from mycelium.cache.passes import (
    PrefixStates,
    compute_pooled,
    compute_prefix,
    place_states,
    pooled_from_prefix,
    shard_pass,
)
from mycelium.cache.store import cached_compute, fits, prefix_bytes
from mycelium.config import TrainConfig
from mycelium.model.blocks import transformer_blocks
from mycelium.model.suffix import suffix_encode, supports_suffix
from mycelium.text import length_buckets, pad_batch
from mycelium.train.attempts import UNFREEZE_BLOCKS, Attempt
from mycelium.train.prepare import Prepared

log = logging.getLogger(__name__)


class Source:
    """What one epoch iterates over: cached pooled features, cached prefix states, or token ids."""

    def __init__(self, prep: Prepared, cfg: TrainConfig, attempt: Attempt):
        self.prep, self.cfg = prep, cfg
        model = prep.model
        n_blocks = len(transformer_blocks(model.backbone))
        self.first_trainable = n_blocks - attempt.unfrozen_layers
        pad_id = prep.tokenizer.pad_token_id
        side = prep.tokenizer.padding_side
        self.pad_id, self.side = pad_id, side
        self.mode = "tokens"
        if cfg.cache:
            key_parts = dict(
                backbone=prep.info.name, revision=prep.info.revision, max_length=cfg.max_length, pooling=model.pooling,
                separator=cfg.spec.separator, fingerprint=prep.data.fingerprint, val_fraction=cfg.val_fraction, seed=cfg.seed,
                precision=prep.precision, context_fields=cfg.spec.context_fields, numbers=cfg.numbers,
            )
            total = sum(len(s) for s in prep.train_ids) + sum(len(s) for s in prep.val_ids)
            # Under bf16/fp16 autocast the states are stored in that dtype: half the memory.
            store = prep.amp_dtype or torch.float32
            prefix_ok = supports_suffix(model) and fits(prefix_bytes(total, model.hidden_size, store), prep.cache_memory_gb)
            fallback_k = n_blocks - min(UNFREEZE_BLOCKS, n_blocks)

            world = prep.world

            def prefix(split: str, k: int):
                ids = prep.train_ids if split == "train" else prep.val_ids
                return self._cached(("prefix", split, k), key_parts, lambda: shard_pass(world, [len(s) for s in ids], lambda rows: compute_prefix(
                    model, [ids[i] for i in rows], k, pad_id=pad_id, pad_side=side, token_budget=prep.pass_budget, device=prep.device,
                    autocast_dtype=prep.amp_dtype, store_dtype=store)))

            def pooled(split: str):
                ids = prep.train_ids if split == "train" else prep.val_ids
                # When the ladder may unfreeze, go through the fallback's prefix so one pass serves both.
                if prefix_ok and "unfreeze" in cfg.fallback_steps():
                    states = prefix(split, fallback_k)
                    return shard_pass(world, [len(s) for s in ids], lambda rows: pooled_from_prefix(
                        model, states, pad_side=side, token_budget=prep.pass_budget, device=prep.device,
                        autocast_dtype=prep.amp_dtype, rows=rows))
                return shard_pass(world, [len(s) for s in ids], lambda rows: compute_pooled(
                    model, [ids[i] for i in rows], pad_id=pad_id, pad_side=side, token_budget=prep.pass_budget,
                    device=prep.device, autocast_dtype=prep.amp_dtype))

            if attempt.unfrozen_layers == 0:
                self.mode = "pooled"
                self.train_x = self._cached(("pooled", "train"), key_parts, lambda: pooled("train"))
                self.val_x = self._cached(("pooled", "val"), key_parts, lambda: pooled("val"))
            elif prefix_ok:
                self.mode = "prefix"
                self.train_x, self.val_x = prefix("train", self.first_trainable), prefix("val", self.first_trainable)
            else:
                log.warning("no prefix cache (%s): running the full forward every epoch",
                            "architecture not supported" if not supports_suffix(model)
                            else f"it would exceed cache_memory_gb={prep.cache_memory_gb:g}")
        log.info("attempt %s: batches from %s", attempt.name, self.mode)

    def _cached(self, name: tuple, key_parts: dict, compute):
        if name in self.prep.cached:
            return self.prep.cached[name]
        value = cached_compute(self.prep.cache, name, key_parts, compute, self.prep.world)
        if isinstance(value, PrefixStates):  # computed or read from disk: on the GPU if it fits there
            value = place_states(value, self.prep.device)
        self.prep.cached[name] = value
        return value

    def lengths(self, split: str) -> list[int]:
        ids = self.prep.train_ids if split == "train" else self.prep.val_ids
        return [len(s) for s in ids]

    def batches(self, split: str, generator: torch.Generator | None) -> list[list[int]]:
        n = len(self.prep.train_ids if split == "train" else self.prep.val_ids)
        if self.mode == "pooled":  # features are fixed-size: plain (shuffled) minibatches
            order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
            size = self.cfg.batch_size if generator is not None else 4096
            return [order[i : i + size] for i in range(0, n, size)]
        return length_buckets(self.lengths(split), self.prep.token_budget, self.cfg.batch_size, generator)

    def logits(self, split: str, idx: list[int]) -> torch.Tensor:
        prep, model = self.prep, self.prep.model
        if self.mode == "pooled":
            x = (self.train_x if split == "train" else self.val_x)[idx].to(prep.device)
            return model.classify(x)
        if self.mode == "prefix":
            hidden, mask = (self.train_x if split == "train" else self.val_x).batch(idx, self.side, prep.device)
            return model.classify(suffix_encode(model, hidden, mask, self.first_trainable))
        ids = prep.train_ids if split == "train" else prep.val_ids
        input_ids, mask = pad_batch([ids[i] for i in idx], self.pad_id, self.side)
        return model(input_ids.to(prep.device), mask.to(prep.device))

