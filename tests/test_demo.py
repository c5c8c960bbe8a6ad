"""The procedural demo corpus: deterministic, whole problems per file, labels reproducible by the
structural labelers, the intended class mix, and no token that gives a class away."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from mycelium.data import demo
from mycelium.data.structural import answer_type, c4_transitions, c5_pairs, final_answer

FILES, PER_FILE = 20, 200


def read_task(root: Path, task: str) -> dict[str, list[dict]]:
    """File name -> records."""
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((root / task).glob("part-*.jsonl"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    stats = demo.write_demo_corpus(str(root), files=FILES, per_file=PER_FILE, seed=3, progress=False, processes=1)
    return root, stats


def test_layout_fields_and_stats(corpus):
    root, stats = corpus
    for task in demo.TASKS:
        files = read_task(root, task)
        assert list(files) == [f"part-{k:05d}.jsonl" for k in range(FILES)]
        records = [r for recs in files.values() for r in recs]
        steps = {"c4": {"step_i", "earlier_steps", "step_j"}, "c5": {"step_i", "step_j"}}.get(task, set())
        expected = {"id", "problem_id", "problem", "label"} | steps
        assert all(set(r) == expected for r in records), task  # no "split", no generator flags
        assert all(isinstance(r[f], str) for r in records for f in expected)
        assert len({r["id"] for r in records}) == len(records)
        # Whole problems: at least per_file records, overshooting by less than one problem's worth.
        assert all(PER_FILE <= len(recs) < PER_FILE + 30 for recs in files.values())
        assert stats[task]["records"] == len(records) and stats[task]["files"] == FILES
        assert stats[task]["labels"] == dict(Counter(r["label"] for r in records).most_common())
        assert stats[task]["problems"] == len({r["problem_id"] for r in records})
        # No solution syntax leaks into model inputs.
        for r in records:
            for f in expected - {"id", "problem_id", "label"}:
                assert "<<" not in r[f] and "####" not in r[f]


def test_problem_ids_never_span_files(corpus):
    root, _ = corpus
    for task in demo.TASKS:
        home: dict[str, str] = {}
        for name, recs in read_task(root, task).items():
            for r in recs:
                assert home.setdefault(r["problem_id"], name) == name, (task, r["problem_id"])


def test_deterministic_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    demo.write_demo_corpus(str(a), files=3, per_file=60, seed=11, progress=False, processes=1)
    demo.write_demo_corpus(str(b), files=3, per_file=60, seed=11, progress=False, processes=2)
    demo.write_demo_corpus(str(c), files=3, per_file=60, seed=12, progress=False, processes=1)
    names = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert len(names) == 9 and names == sorted(p.relative_to(b) for p in b.rglob("*.jsonl"))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()  # worker count does not matter
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names)  # the seed does


def test_labels_agree_with_rerunning_the_labelers():
    """Records are exactly what the structural rules say about the generated solution."""
    for task in demo.TASKS:
        for k in range(3):
            for pid, problem, records in demo.iter_file_problems(task, k, per_file=PER_FILE, seed=5):
                assert all(r["problem_id"] == pid and r["problem"] == problem.question for r in records)
                if task == "c6":
                    assert [r["label"] for r in records] == [answer_type(final_answer(problem.solution))]
                    continue
                rerun = (c4_transitions if task == "c4" else c5_pairs)(problem.question, problem.solution)
                assert [(r["step_i"], r["step_j"], r["label"]) for r in records] == [
                    (x["step_i"], x["step_j"], x["label"]) for x in rerun
                ]


def share(stats: dict, task: str, label: str) -> float:
    return stats[task]["labels"].get(label, 0) / stats[task]["records"]


def test_class_mix(corpus):
    """Targets at the default size: C4 ~2.6% BRIDGING, C5 DEPENDS ~47%, C6 INTEGER ~62% with
    every tail type present.  Tolerances cover sampling noise at 20 x 200 records."""
    _, stats = corpus
    assert 0.016 <= share(stats, "c4", "BRIDGING") <= 0.038
    assert 0.38 <= share(stats, "c5", "DEPENDS") <= 0.56
    assert 0.55 <= share(stats, "c6", "INTEGER") <= 0.70
    for label, floor in (("DECIMAL", 0.06), ("FRACTION", 0.04), ("RADICAL", 0.025), ("SET", 0.025), ("EXPRESSION", 0.025), ("INTERVAL", 0.015)):
        assert share(stats, "c6", label) >= floor, label
    assert set(stats["c6"]["labels"]) <= {"INTEGER", "DECIMAL", "FRACTION", "RADICAL", "SET", "EXPRESSION", "INTERVAL"}


def tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]", text.lower()))


@pytest.mark.parametrize("task, fields", [("c4", ("step_i", "step_j")), ("c5", ("step_i", "step_j")), ("c6", ("problem",))])
def test_no_class_is_given_away_by_a_single_token(corpus, task, fields):
    """No token may appear in a large share of a (non-majority) class's inputs and almost never
    elsewhere: the label has to be read from the numbers and their relations, not a marker.
    Genuine cue phrases real data has ("interval notation", "common fraction") are allowed while
    they cover under 30% of their class."""
    root, _ = corpus
    by_label: dict[str, list[set[str]]] = defaultdict(list)
    for recs in read_task(root, task).values():
        for r in recs:
            by_label[r["label"]].append(tokens(" ".join(r[f] for f in fields)))
    df = {label: Counter(t for toks in docs for t in toks) for label, docs in by_label.items()}
    total = Counter()
    for counts in df.values():
        total.update(counts)
    majority = max(by_label, key=lambda label: len(by_label[label]))
    offenders = []
    for label, docs in by_label.items():
        if label == majority or len(docs) < 30:
            continue
        for tok, n in df[label].items():
            if n / len(docs) >= 0.30 and n / total[tok] >= 0.95:
                offenders.append((label, tok, round(n / len(docs), 2), round(n / total[tok], 3)))
    assert not offenders, offenders
