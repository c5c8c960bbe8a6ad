"""``mycelium data stats``: what is under a prefix, before anyone trains on it.

Loads in skip mode with the class check off, so a broken data set is described (bad records by
reason, missing classes, split preview) instead of stopping at the first problem.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from mycelium.data.loading import DataError, class_problem, load_task_data
from mycelium.data.split import SPLITS, split_records
from mycelium.tasks import TaskSpec

REJECT_SAMPLE = 10


def stats_report(
    uri: str,
    spec: TaskSpec,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    **load_kwargs: Any,
) -> dict[str, Any]:
    """A JSON-serialisable description of the data under ``uri`` for ``spec``.

    ``load_kwargs`` go to ``load_task_data`` (field_map, label_names, cache_dir, ...);
    ``on_error`` defaults to "skip" so bad records are counted rather than raised.
    """
    load_kwargs.setdefault("on_error", "skip")
    load_kwargs.setdefault("check_classes", False)
    data = load_task_data(uri, spec, **load_kwargs)
    total = sum(data.class_counts.values())
    problem = class_problem(spec, data.class_counts, data.label_names)

    split_info: dict[str, Any]
    try:
        sp = split_records(data.records, data.labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        split_info = {"method": sp.method, "counts": sp.counts, "warnings": sp.warnings, "error": None}
    except DataError as e:
        split_info = {"method": None, "counts": None, "warnings": [], "error": str(e)}

    return {
        "uri": data.uri,
        "task": spec.name,
        "fingerprint": data.fingerprint,
        "field_map": data.field_map,
        "label_names": list(data.label_names) if data.label_names else None,
        "n_files": len(data.files),
        "n_bytes": sum(f.size for f in data.files),
        "files": [{"uri": f.uri, "size": f.size, "etag": f.etag} for f in data.files],
        "ignored": data.ignored,
        "n_records": len(data.records),
        "n_problems": len({r.problem_id for r in data.records}),
        "n_skipped": data.n_skipped,
        "n_unreadable_files": data.n_unreadable_files,
        "labels": list(data.labels),
        "class_counts": dict(data.class_counts),
        "class_percent": {k: (100.0 * v / total if total else 0.0) for k, v in data.class_counts.items()},
        "class_problem": problem,  # None when the classes can be trained on
        "reject_kinds": dict(Counter(r["kind"] for r in data.rejects)),
        "rejects_sample": [
            {k: r.get(k) for k in ("file", "line", "kind", "reason", "raw")} for r in data.rejects[:REJECT_SAMPLE]
        ],
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed, **split_info},
        "n_downloaded": data.n_downloaded,
    }


def print_stats(report: dict[str, Any], console: Console | None = None) -> None:
    """Render a ``stats_report`` as rich tables."""
    con = console or Console()
    con.print(
        f"[bold]{report['uri']}[/bold]  task [bold]{report['task']}[/bold]  "
        f"fingerprint [cyan]{report['fingerprint']}[/cyan]"
    )
    con.print(
        f"{report['n_files']} file(s), {report['n_bytes']:,} bytes, {report['n_records']:,} record(s) "
        f"from {report['n_problems']:,} problem(s); {report['n_skipped']:,} bad record(s) skipped"
        + (f", {report['n_unreadable_files']} unreadable file(s) (records lost: see below)" if report["n_unreadable_files"] else "")
        + (f"; {len(report['ignored'])} non-data object(s) ignored" if report["ignored"] else "")
    )

    split = report["split"]
    split_counts = split.get("counts")
    table = Table(title="class distribution")
    table.add_column("label")
    table.add_column("records", justify="right")
    table.add_column("%", justify="right")
    if split_counts:
        for s in SPLITS:
            if any(split_counts[s].values()):
                table.add_column(s, justify="right")
    for lab in report["labels"]:
        row = [lab, f"{report['class_counts'][lab]:,}", f"{report['class_percent'][lab]:.1f}"]
        if split_counts:
            row += [f"{split_counts[s].get(lab, 0):,}" for s in SPLITS if any(split_counts[s].values())]
        table.add_row(*row)
    con.print(table)

    if report["class_problem"]:
        con.print(f"[bold red]cannot train:[/bold red] {report['class_problem']}")
    if split.get("error"):
        con.print(f"[bold red]split:[/bold red] {split['error']}")
    for w in split.get("warnings") or []:
        con.print(f"[yellow]warning:[/yellow] {w}")

    if report["reject_kinds"]:
        bad = Table(title="bad records")
        bad.add_column("reason")
        bad.add_column("count", justify="right")
        for kind, n in sorted(report["reject_kinds"].items(), key=lambda kv: -kv[1]):
            bad.add_row(kind, f"{n:,}")
        con.print(bad)
        sample = Table(title=f"first {len(report['rejects_sample'])} bad record(s)")
        sample.add_column("where", overflow="fold")
        sample.add_column("reason", overflow="fold")
        for r in report["rejects_sample"]:
            sample.add_row(f"{r['file']}:{r['line']}", r["reason"])
        con.print(sample)
