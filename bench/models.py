"""Random-weight Qwen2-architecture backbones for the bench, written to disk without any download.

Throughput does not depend on weight values, so a model built from the architecture's config
with random weights times the same as the trained one.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2.5-0.5B(-Instruct)'s config.json, the fields that shape compute and memory.
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def make_qwen2(path: str | Path, *, seed: int = 0, **arch) -> Path:
    """A random ``Qwen2Model`` with ``arch`` (Qwen2Config fields) and a byte-level BPE Qwen2
    tokenizer (``mycelium.tiny_models.make_qwen2_tokenizer``, left padding like Qwen2.5).

    The tokenizer's ids are all below its 4096 entries; ``vocab_size`` in ``arch`` sizes the
    embedding as the real model's (151936 for Qwen2.5), which costs memory, not compute.
    """
    import torch
    from transformers import AutoModel, Qwen2Config

    from mycelium.model.tiny import make_qwen2_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_qwen2_tokenizer(vocab_size=4096, padding_side="left")
    arch = dict(arch)
    arch["vocab_size"] = max(int(arch.get("vocab_size", 0)), len(tok))
    config = Qwen2Config(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def describe(arch: dict) -> str:
    return (f"Qwen2 architecture, {arch['num_hidden_layers']} blocks, hidden {arch['hidden_size']}, "
            f"intermediate {arch['intermediate_size']}, {arch['num_attention_heads']} heads / "
            f"{arch['num_key_value_heads']} kv heads, vocab {arch.get('vocab_size', 4096)}, random weights")


def count_params(path: str | Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no weights loaded)."""
    import json
    import struct

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            size = 1
            for d in meta["shape"]:
                size *= d
            total += size
    return total
