"""Architecture knowledge: where the transformer blocks are, pooling, freezing, and running only the
last blocks on cached hidden states (the suffix forward).

Freezing: ``apply_freezing(backbone, n)`` leaves only the last ``n`` transformer blocks (and the
final norm after them, when the architecture has one) trainable; ``n = 0`` is the seed's
"frozen backbone, classification head only".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from mycelium.model.pooling import POOLINGS

if TYPE_CHECKING:
    from mycelium.model.classifier import Classifier


def decoder_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left- or right-) padded decoder batch: a row sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a name ("bf16", "bfloat16", "torch.float16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    return resolved


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last real token: the rightmost position whose mask is 1, so it
    is right for left and right padding alike (an all-padding row gives 0)."""
    B, T = attention_mask.shape
    positions = torch.arange(T, device=attention_mask.device).expand(B, T)
    return torch.where(attention_mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``[B, T, H]`` hidden states -> ``[B, H]`` features.

    ``last``: the hidden state of each row's last real token, found from the mask, so it is right
    for left and right padding alike. ``mean``: mean over real tokens, accumulated in float32.
    """
    B, T, _ = hidden.shape
    mask = attention_mask.to(hidden.device)
    if kind == "last":
        return hidden[torch.arange(B, device=hidden.device), last_positions(mask)]
    if kind == "mean":
        m = mask.to(torch.float32).unsqueeze(-1)
        summed = (hidden.to(torch.float32) * m).sum(dim=1)
        return (summed / m.sum(dim=1).clamp_min(1.0)).to(hidden.dtype)
    raise ValueError(f"unknown pooling {kind!r}: choose one of {', '.join(POOLINGS)}")


def _base(backbone: nn.Module) -> nn.Module:
    # A *ForCausalLM / *ForSequenceClassification wrapper keeps the transformer in `.model` etc.
    for attr in ("model", "transformer", "bert", "roberta"):
        inner = getattr(backbone, attr, None)
        if isinstance(inner, PreTrainedModel):
            return inner
    return backbone


def transformer_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: Qwen2/Llama ``.layers``, BERT ``.encoder.layer``, GPT-2 ``.h``;
    otherwise the largest ``ModuleList`` in the model."""
    base = _base(backbone)
    for path in ("layers", "encoder.layer", "h", "decoder.layers", "transformer.h", "blocks"):
        obj: object = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"no transformer blocks (nn.ModuleList) found in {type(backbone).__name__}")
    return max(lists, key=len)


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The norm after the last block (Qwen2/Llama ``.norm``, GPT-2 ``.ln_f``); None when absent (BERT)."""
    base = _base(backbone)
    for attr in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(base, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def apply_freezing(backbone: nn.Module, n_unfrozen: int) -> None:
    """Freeze everything, then make the last ``n_unfrozen`` blocks (+ the final norm, if any) trainable."""
    blocks = transformer_blocks(backbone)
    if n_unfrozen < 0 or n_unfrozen > len(blocks):
        raise ValueError(
            f"cannot unfreeze {n_unfrozen} blocks: {type(backbone).__name__} has {len(blocks)} (0..{len(blocks)})"
        )
    backbone.requires_grad_(False)
    for module in unfrozen_modules(backbone, n_unfrozen):
        module.requires_grad_(True)


def unfrozen_modules(backbone: nn.Module, n_unfrozen: int) -> list[nn.Module]:
    """What unfreezing ``n_unfrozen`` blocks trains: the last blocks and, when the architecture has
    one, the final norm (it sits between them and the head)."""
    if n_unfrozen == 0:
        return []
    blocks = transformer_blocks(backbone)
    norm = final_norm(backbone)
    return [*blocks[len(blocks) - n_unfrozen :], *([norm] if norm is not None else [])]


def compute_dtype(model: Classifier) -> torch.dtype:
    """The dtype of the residual stream in the full forward: the backbone's parameter dtype."""
    return next(model.backbone.parameters()).dtype


class ModesSaved:
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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
