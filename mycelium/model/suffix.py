"""Running only the trainable last blocks on cached hidden states (prefix capture is in
``mycelium.cache.passes``).

``suffix_encode`` supports rotary decoder-only backbones laid out like Qwen2 (``layers``,
``rotary_emb``, ``norm``: Qwen2, Qwen3, Llama, Mistral) and BERT-style encoders
(``embeddings`` + ``encoder.layer``: BERT, RoBERTa, MiniLM). ``supports_suffix`` says whether a
model is one of them; ``verify_suffix`` compares suffix and full forward on a few inputs, a cheap
check before a long run on an unfamiliar backbone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mycelium.model.blocks import _base, compute_dtype, decoder_position_ids, final_norm, last_positions, model_device, pool, transformer_blocks
from mycelium.model.classifier import Classifier

_ROTARY_DECODERS = frozenset({"qwen2", "qwen3", "llama", "mistral"})
_BERT_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})




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
    device = model_device(model)
    hidden = hidden.to(device=device, dtype=compute_dtype(model))
    attention_mask = attention_mask.to(device)
    arch = _arch(model)
    config = base.config
    pooled_tail = False  # the last block already left one row per input (``last`` pooling)

    if first_trainable < n:
        if arch == "rotary_decoder":
            from transformers.masking_utils import (
                create_causal_mask,
                create_sliding_window_causal_mask,
            )

            position_ids = decoder_position_ids(attention_mask)
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
            from transformers.masking_utils import (
                create_bidirectional_mask,
                create_causal_mask,
            )

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



