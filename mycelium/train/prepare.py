"""Data and backbone, loaded once per training and shared by every attempt; device and precision
decided once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mycelium.cache.store import FeatureCache, auto_cache_budget_gb
from mycelium.config import TrainConfig
from mycelium.data.loading import LoadedData, load_task_data
from mycelium.distributed import SOLO, World
from mycelium.data.split import Split, split_records
from mycelium.model.backbone import BackboneInfo, load_backbone
from mycelium.model.blocks import transformer_blocks, unfrozen_modules
from mycelium.model.classifier import Classifier
from mycelium.text import encode_rows
from mycelium.train.attempts import UNFREEZE_BLOCKS


def resolve_device(cfg: TrainConfig, world: World = SOLO) -> torch.device:
    """``-P device``, or a GPU when there is one; under data parallelism a rank's own GPU (``LOCAL_RANK``)."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype | None]:
    """``auto``: bf16 where the GPU supports it, fp16 (with a grad scaler) on older GPUs, fp32 on CPU."""
    if cfg.precision == "auto":
        if device.type != "cuda":
            return "fp32", None
        return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"parameter precision={cfg.precision} needs a CUDA GPU; use -P precision=auto or fp32 on {device}")
    return cfg.precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


@dataclass
class Prepared:
    """Data and backbone, loaded once per training and shared by every attempt."""

    data: LoadedData
    split: Split
    labels: list[str]
    y_train: torch.Tensor
    y_val: torch.Tensor
    train_ids: list[list[int]]
    val_ids: list[list[int]]
    val_rows: list[tuple[str, ...]]
    model: Classifier
    tokenizer: object
    info: BackboneInfo
    pristine: dict[str, torch.Tensor]  # backbone weights of blocks an attempt may train, to reset between attempts
    device: torch.device
    precision: str
    amp_dtype: torch.dtype | None
    cache: FeatureCache | None
    token_budget: int  # resolved: padded tokens per training batch
    pass_budget: int  # resolved: padded tokens per batch of the no-grad backbone passes (features, prefix states)
    cache_memory_gb: float  # resolved: the largest prefix cache, GiB
    world: World = SOLO  # this process among the data-parallel ranks
    cached: dict[tuple, object] = field(default_factory=dict)

    def autocast(self):
        """The precision context of a forward pass, decided once (bf16/fp16 autocast on a GPU, none on a CPU)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def prepare(cfg: TrainConfig, world: World = SOLO) -> Prepared:
    """Data, split, backbone and token ids. Rank 0 alone reads the data (from S3) and sends it to
    the other ranks; each rank loads the backbone and tokenizes for itself."""
    spec = cfg.spec
    data = world.broadcast(load_task_data(cfg.data, spec, field_map=cfg.field_map or None, label_names=cfg.label_names or None,
                                          on_error=cfg.on_error) if world.main else None)
    split = split_records(data.records, data.labels, val_fraction=cfg.val_fraction, seed=cfg.seed)
    labels = list(data.labels)
    index = {name: i for i, name in enumerate(labels)}

    device = resolve_device(cfg, world)
    precision, amp_dtype = resolve_precision(cfg, device)
    # fp32 master weights: transformers 5 would load Qwen2.5 in its config's bf16, where AdamW steps
    # at lr 2e-5 on unfrozen blocks round away; autocast gives bf16/fp16 speed on the GPU.
    backbone, tokenizer, info = load_backbone(cfg.backbone, cfg.revision or None, dtype=torch.float32,
                                              pooling=cfg.pooling)
    torch.manual_seed(cfg.seed)
    model = Classifier(backbone, len(labels), pooling=info.pooling, dropout=cfg.dropout).to(device)

    # Tokenize once; every attempt and epoch reuses the ids.
    def encode(records):
        return encode_rows(tokenizer, [r.inputs for r in records], spec.input_fields, spec.separator, cfg.max_length,
                           spec.context_fields, cfg.numbers)

    train_ids, val_ids = encode(split.train), encode(split.val)

    n_blocks = len(transformer_blocks(model.backbone))
    trainable_names = _names_of_last_blocks(model, min(n_blocks, max(cfg.unfrozen_layers, UNFREEZE_BLOCKS if "unfreeze" in cfg.fallback_steps() else 0)))
    pristine = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable_names}
    return Prepared(
        data=data, split=split, labels=labels,
        y_train=torch.tensor([index[r.label] for r in split.train]),
        y_val=torch.tensor([index[r.label] for r in split.val]),
        train_ids=train_ids, val_ids=val_ids, val_rows=[r.inputs for r in split.val],
        model=model, tokenizer=tokenizer, info=info, pristine=pristine,
        device=device, precision=precision, amp_dtype=amp_dtype,
        cache=FeatureCache() if cfg.cache else None,
        token_budget=cfg.token_budget or (8192 if device.type == "cuda" else 4096),
        pass_budget=cfg.token_budget or (8192 if device.type == "cuda" else 2048),
        # Rank 0's: whether the prefix cache fits decides which collective passes run, so ranks agree on it.
        cache_memory_gb=world.broadcast(cfg.cache_memory_gb or round(auto_cache_budget_gb(), 1)),
        world=world,
    )


def _names_of_last_blocks(model: Classifier, n: int) -> set[str]:
    """Parameter names of the last ``n`` blocks and the final norm: what an unfreezing attempt may change."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)] for m in unfrozen_modules(model.backbone, n) for p in m.parameters()}

