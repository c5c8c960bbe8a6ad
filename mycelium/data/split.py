"""Train/validation/test split that never separates a problem's records.

A record's ``split`` field wins when present. Otherwise the split is a pure function of
``problem_id`` and ``seed`` (sha256, no RNG state, no record order), so it is identical across
runs, machines, Python versions and file orderings, and every record of a problem lands on the
same side: the validation metric never sees a problem whose sibling steps were trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from mycelium.data.loading import SPLIT_ALIASES, DataError, Record

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_MIN_VAL_PER_CLASS = 10


@dataclass
class Split:
    train: list[Record]
    val: list[Record]
    test: list[Record]
    counts: dict[str, dict[str, int]]  # split -> label -> count (every label, zeros included)
    warnings: list[str] = field(default_factory=list)
    # How the assignment was made: "hash" (no split fields), "field" (all records had one) or
    # "mixed" (field where present, hash elsewhere). Worth logging next to the fingerprint.
    method: str = "hash"

    def by_name(self, name: str) -> list[Record]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def hash_fraction(problem_id: str, seed: int = 0) -> float:
    """Deterministic position of a problem in [0, 1): the first 8 bytes of sha256(salt + id)."""
    digest = hashlib.sha256(f"mycelium-split:{seed}:{problem_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(problem_id: str, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0) -> str:
    """Split of a problem without a ``split`` field.

    val takes [0, val_fraction) and test the next test_fraction, so adding a test set only takes
    problems from train and leaves the validation set (and checkpoint comparisons) unchanged.
    """
    u = hash_fraction(problem_id, seed)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def _normalise_split(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    try:
        return SPLIT_ALIASES[value.strip().lower()]
    except KeyError:
        raise DataError(f"unknown split {value!r} (expected train, val or test; validation and dev mean val)") from None


def split_records(
    records: Iterable[Record],
    labels: Sequence[str],
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    min_val_per_class: int = DEFAULT_MIN_VAL_PER_CLASS,
) -> Split:
    """Split ``records`` into train/val/test, grouped by ``problem_id``; see the module docstring.

    Raises ``DataError`` when training or validation data is empty or when a class that appears
    in validation never appears in training (its F1 would measure nothing the model could learn).
    Warns (``Split.warnings``) when a class has fewer than ``min_val_per_class`` validation records.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction must be >= 0 with val_fraction + test_fraction < 1, got {test_fraction}")

    parts: dict[str, list[Record]] = {s: [] for s in SPLITS}
    n_field = n_hash = 0
    sides: dict[str, set[str]] = defaultdict(set)  # problem_id -> splits its records went to
    records = list(records)
    for rec in records:
        explicit = _normalise_split(rec.split)
        if explicit is not None:
            side = explicit
            n_field += 1
        else:
            side = assign_split(rec.problem_id, val_fraction, test_fraction, seed)
            n_hash += 1
        parts[side].append(rec)
        sides[rec.problem_id].add(side)

    warnings: list[str] = []
    method = "field" if n_hash == 0 and n_field else "mixed" if n_field else "hash"
    if method == "mixed":
        warnings.append(
            f"{n_field} record(s) have a split field and {n_hash} do not; the latter were split by "
            f"hashing problem_id (val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    # Only explicit split fields can separate a problem; say so rather than leak silently.
    leaking = sorted(pid for pid, s in sides.items() if len(s) > 1)
    if leaking:
        warnings.append(
            f"{len(leaking)} problem(s) have records in more than one split because of their split "
            f"fields (e.g. {', '.join(leaking[:5])}); validation scores may be optimistic"
        )

    label_order = list(labels) + sorted({r.label for r in records} - set(labels))
    counts = {s: {lab: 0 for lab in label_order} for s in SPLITS}
    for s in SPLITS:
        for lab, n in Counter(r.label for r in parts[s]).items():
            counts[s][lab] += n

    n_problems = len(sides)
    if not parts["train"]:
        raise DataError(
            f"the training split is empty ({len(records)} record(s), {n_problems} problem(s)); "
            f"check the split fields or lower val_fraction/test_fraction"
        )
    if not parts["val"]:
        raise DataError(
            f"the validation split is empty: none of {n_problems} problem(s) fell into val with "
            f"val_fraction={val_fraction} (seed {seed}); use more problems, a larger val_fraction, "
            f"or split fields (split=val) in the data"
        )
    unseen = [lab for lab in label_order if counts["val"][lab] > 0 and counts["train"][lab] == 0]
    if unseen:
        raise DataError(
            "class(es) present in validation but absent from training: "
            + ", ".join(f"{lab} ({counts['val'][lab]} val record(s))" for lab in unseen)
            + "; add training data for them, change the seed/val_fraction, or fix the split fields"
        )
    for lab in label_order:
        n_val = counts["val"][lab]
        if n_val < min_val_per_class:
            warnings.append(
                f"class {lab} has only {n_val} validation record(s) (< {min_val_per_class}): "
                f"F1 for {lab} is not meaningful"
            )
    for w in warnings:
        log.warning("%s", w)
    return Split(train=parts["train"], val=parts["val"], test=parts["test"], counts=counts, warnings=warnings, method=method)
