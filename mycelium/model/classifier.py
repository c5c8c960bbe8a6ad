"""Backbone + pooling + classification head, and the optimizer's parameter groups.

Frozen parts are kept in eval mode even while the classifier trains (see ``Classifier.train``)
so their outputs are deterministic and can be cached across epochs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from mycelium.model.pooling import DEFAULT_POOLING, POOLINGS
from mycelium.model.backbone import is_decoder_only
from mycelium.model.blocks import decoder_position_ids, pool


class ClassificationHead(nn.Module):
    """LayerNorm -> Dropout -> Linear(H, H) -> GELU -> Dropout -> Linear(H, k).

    The input LayerNorm puts features from any backbone on one scale: Qwen2's last hidden states
    have a few outlier dimensions far larger than the rest, and with a frozen backbone the head
    is all that can adapt to them. The hidden layer gives a frozen-backbone run (C4/C5) a little
    nonlinearity on top of the pooled features, like RoBERTa's classification head.
    """

    def __init__(self, hidden_size: int, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout1 = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.dropout2 = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout1(self.norm(features))
        x = self.dropout2(self.act(self.dense(x)))
        return self.out(x)


class Classifier(nn.Module):
    """Backbone -> pooling -> head. ``forward(input_ids, attention_mask) -> logits [B, k]``."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        n_classes: int,
        pooling: str = DEFAULT_POOLING,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        # Decoders get explicit position ids from the mask so a left-padded row sees the same
        # positions as the row alone (matters for absolute-position models such as GPT-2).
        self.decoder = is_decoder_only(backbone.config)
        self.hidden_size = int(backbone.config.hidden_size)
        self.n_classes = n_classes
        self.head = ClassificationHead(self.hidden_size, n_classes, dropout)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[B, H]`` (what a frozen-backbone feature cache stores)."""
        kwargs = {}
        if getattr(self.backbone.config, "use_cache", False):
            kwargs["use_cache"] = False  # a classifier never decodes: no key/value cache to build
        if self.decoder:
            kwargs["position_ids"] = decoder_position_ids(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features; cast to the head's dtype (the backbone may run in bf16/fp16)."""
        return self.head(features.to(self.head.out.weight.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(input_ids, attention_mask))

    def train(self, mode: bool = True) -> Classifier:
        # Frozen parts stay in eval mode (no dropout), so their outputs match a feature cache and
        # do not change from epoch to epoch; trainable blocks get the requested mode.
        super().train(mode)
        self.backbone.eval()
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters(recurse=True))
                if params and all(p.requires_grad for p in params):
                    module.train(True)
        return self


def param_groups(
    model: Classifier, lr_head: float, lr_backbone: float, weight_decay: float = 0.01
) -> list[dict]:
    """AdamW parameter groups: the head at ``lr_head``; trainable backbone params at ``lr_backbone``
    (the group is left out when the backbone is fully frozen)."""
    groups = [
        {"name": "head", "params": [p for p in model.head.parameters() if p.requires_grad],
         "lr": lr_head, "weight_decay": weight_decay},
    ]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone:
        groups.append({"name": "backbone", "params": backbone, "lr": lr_backbone, "weight_decay": weight_decay})
    return groups


def count_trainable(model: Classifier) -> dict[str, int]:
    """Trainable parameter counts ``head``, ``backbone``, ``total``; ``backbone_total`` counts all backbone params."""
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    return {
        "head": head,
        "backbone": backbone,
        "total": head + backbone,
        "backbone_total": sum(p.numel() for p in model.backbone.parameters()),
    }

