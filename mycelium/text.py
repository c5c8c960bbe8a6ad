"""From raw record fields to token ids and padded batches — the one path shared by training,
evaluation and serving, so a served model sees exactly what training saw."""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

import torch


NUMBER_MODES = ("keep", "symbols")
# A number as written in text: thousands commas, decimals, leading-dot decimals; not inside a word
# ("x2", "H2O") or a longer number.
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\w])")


def number_symbols(fields: Sequence[str]) -> list[str]:
    """Each number of a record replaced by a symbol (``N1``, ``N2``, ... in order of first
    appearance), the same symbol for the same value in every field of the record.

    The number-mapping of math word problem solvers (Wang et al., EMNLP 2017): which step reuses
    which quantity becomes a repeated token the model can match, and the particular values, which
    say nothing about the label, are gone.
    """
    table: dict[Fraction, str] = {}

    def symbol(m: re.Match) -> str:
        value = Fraction(m.group(1).replace(",", ""))
        return table.setdefault(value, f"N{len(table) + 1}")

    return [_NUMBER.sub(symbol, f) for f in fields]


def join_inputs(inputs: Sequence[str], separator: str) -> str:
    """``("step_i", "step_j")`` -> ``"step_i [SEP] step_j"`` (the seed's pair format); one field as is."""
    return separator.join(inputs)


def tokenize(tokenizer, texts: Sequence[str], max_length: int | None, batch_size: int = 4096) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` (``None``: not truncated), unpadded
    (batches pad to their own longest).

    Fast tokenizers encode a whole list in Rust threads; chunking keeps memory flat on big corpora.
    """
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            truncation=max_length is not None,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        ids.extend(enc["input_ids"])
    return ids


def encode_rows(tokenizer, rows: Sequence[Sequence[str]], fields: Sequence[str], separator: str, max_length: int,
                context_fields: Sequence[str] = (), numbers: str = "keep") -> list[list[int]]:
    """Token ids of records given as field values in ``fields`` order, at most ``max_length`` each.

    A row over the limit loses the end of its context fields (the problem text) first, so the
    steps the label is about stay whole; only rows whose other fields alone are too long are cut
    at the end, as plain truncation would.
    """
    if numbers == "symbols":  # before truncation, so a cut context does not renumber the steps
        rows = [number_symbols(row) for row in rows]
    texts = [join_inputs(row, separator) for row in rows]
    ids = tokenize(tokenizer, texts, None)
    ctx = [i for i, name in enumerate(fields) if name in context_fields]
    for r, seq in enumerate(ids):
        if len(seq) <= max_length:
            continue
        row = list(rows[r])
        for _ in range(3):  # a cut can merge tokens at the boundary: re-measure, cut again if needed
            excess = len(seq) - max_length
            if excess <= 0 or not any(row[i] for i in ctx):
                break
            for i in ctx:
                row[i], excess = _cut_end(tokenizer, row[i], excess)
            seq = tokenize(tokenizer, [join_inputs(row, separator)], None)[0]
        ids[r] = seq if len(seq) <= max_length else tokenize(tokenizer, [join_inputs(row, separator)], max_length)[0]
    return ids


def _cut_end(tokenizer, text: str, n_tokens: int) -> tuple[str, int]:
    """``text`` without its last ``n_tokens`` tokens (one more, for boundary merges), and how many
    tokens are still to cut elsewhere."""
    if n_tokens <= 0 or not text:
        return text, n_tokens
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets: cut by words
        words = text.split()
        keep = max(0, len(words) - n_tokens - 1)
        return " ".join(words[:keep]), max(0, n_tokens - len(words))
    keep = len(offsets) - n_tokens - 1
    if keep <= 0:
        return "", n_tokens - len(offsets)
    return text[: offsets[keep - 1][1]].rstrip(), 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence in the batch; returns ``(input_ids, attention_mask)`` as int64."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if side == "left":
            ids[row, longest - n :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, longest - n :] = 1
        else:
            ids[row, :n] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, :n] = 1
    return ids, mask


def length_buckets(lengths: Sequence[int], token_budget: int, max_batch: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Batches of indices with similar lengths, each under ``token_budget`` padded tokens.

    Sorting by length keeps padding waste near zero (the design's lower bound is one pass over
    real tokens); with a generator, the order of batches (and ties) is shuffled for training.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if generator is not None:
        # Shuffle within equal lengths so repeated epochs do not see identical batches.
        noise = torch.rand(len(lengths), generator=generator).tolist()
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], noise[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and (longest_if_added * (len(current) + 1) > token_budget or len(current) >= max_batch):
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    if generator is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[p] for p in perm]
    return batches
