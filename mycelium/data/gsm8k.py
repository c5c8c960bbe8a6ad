"""Turn GSM8K-format JSONL (``question``, ``answer`` per line) into C4 and C5 record files.

The labels come from the structural rules in ``mycelium.data.structural``; this module only reads,
groups and writes.  Files are packed by whole problems, so the records of one problem never span
two files (the loader splits by ``problem_id``; keeping a problem in one file also keeps partial
reads honest).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import PurePosixPath
from typing import Iterable, Iterator

from mycelium import storage
from mycelium.data.structural import c4_transitions, c5_pairs, parse_solution, record_fields


def to_jsonl(records: Iterable[dict]) -> bytes:
    """JSON Lines bytes; keys sorted so the same records always give the same bytes."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def pack_by_problem(groups: Iterable[list[dict]], per_file: int) -> Iterator[list[dict]]:
    """Pack per-problem record groups into files of at most ``per_file`` records (a single problem
    larger than that gets a file of its own); a group is never split."""
    if per_file < 1:
        raise ValueError(f"per_file must be >= 1, got {per_file}")
    current: list[dict] = []
    for group in groups:
        if current and len(current) + len(group) > per_file:
            yield current
            current = []
        current.extend(group)
    if current:
        yield current


def part_name(k: int) -> str:
    return f"part-{k:05d}.jsonl"


def _read_lines(src: str) -> list[str]:
    data = storage.read_bytes(src)
    if src.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8").splitlines()


def _problem_id(question: str, record: dict) -> str:
    # An id from the text itself: the same question always lands in the same split, even when it
    # appears twice or the file is reordered.
    if isinstance(record.get("id"), (str, int)) and str(record["id"]):
        return f"gsm8k-{record['id']}"
    return "gsm8k-" + hashlib.sha1(question.encode("utf-8")).hexdigest()[:16]


def convert_gsm8k(src: str, dest_prefix: str, *, per_file: int = 583) -> dict:
    """Read GSM8K-format JSONL at ``src`` (local path or URI) and write
    ``{dest_prefix}/c4/part-NNNNN.jsonl`` and ``{dest_prefix}/c5/part-NNNNN.jsonl``.

    Records: ``id``, ``problem_id``, ``problem``, ``step_i``, ``step_j``, ``label``; C4's also
    ``earlier_steps`` (every step before ``step_j``).
    Returns ``{"problems": n, "c4": {"files", "records", "labels"}, "c5": {...}}``.
    A malformed line raises ValueError naming the file and line; nothing is skipped silently.
    """
    name = PurePosixPath(src).name
    c4_groups: list[list[dict]] = []
    c5_groups: list[list[dict]] = []
    problems = 0
    for lineno, line in enumerate(_read_lines(src), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{src}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{src}:{lineno}: expected a JSON object, got {type(record).__name__}")
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{src}:{lineno}: field {key!r} missing or not a non-empty string")
        question, answer = record["question"], record["answer"]
        problems += 1
        pid = _problem_id(question, record)
        steps = parse_solution(answer)
        # Record ids carry the source line, so a question repeated in the file still gets unique ids.
        prefix = f"{name}:{lineno}"
        c4_groups.append(
            [
                {"id": f"{prefix}:c4:{r['j']}", "problem_id": pid, "problem": question, **record_fields(r)}
                for r in c4_transitions(question, steps)
            ]
        )
        c5_groups.append(
            [
                {"id": f"{prefix}:c5:{r['i']}-{r['j']}", "problem_id": pid, "problem": question, **record_fields(r)}
                for r in c5_pairs(question, steps)
            ]
        )

    stats: dict = {"problems": problems}
    for task, groups in (("c4", c4_groups), ("c5", c5_groups)):
        files = 0
        labels: Counter[str] = Counter()
        records = 0
        for k, chunk in enumerate(pack_by_problem((g for g in groups if g), per_file)):
            storage.write_bytes(storage.join(dest_prefix, task, part_name(k)), to_jsonl(chunk))
            files += 1
            records += len(chunk)
            labels.update(r["label"] for r in chunk)
        stats[task] = {"files": files, "records": records, "labels": dict(sorted(labels.items()))}
    return stats
