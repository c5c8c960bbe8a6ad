"""Loading task data: formats, mapping, fingerprint, validation messages, skip mode, S3 + cache.

Local tests use tmp folders; S3 tests run against the real embedded SeaweedFS (``stack``).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mycelium import storage
from mycelium.data.loading import (
    DataError,
    Record,
    load_task_data,
    parse_field_map,
    parse_label_names,
    resolve_field_map,
    write_rejects_jsonl,
)
from mycelium.tasks import get_task

C4 = get_task("c4")
C6 = get_task("c6")


# ----------------------------------------------------------------------------- helpers


def c4_rows(n_problems: int = 6, steps: int = 3, start: int = 0) -> list[dict]:
    """Both classes present; the first step of each problem has an empty step_i (allowed in C4)."""
    rows = []
    for p in range(start, start + n_problems):
        for s in range(steps):
            rows.append(
                {
                    "id": f"p{p}-s{s}",
                    "problem_id": f"p{p}",
                    "step_i": "" if s == 0 else f"a = {s} * 2",
                    "step_j": f"b = a + {s}",
                    "label": "BRIDGING" if s == 1 else "NOT_BRIDGING",
                }
            )
    return rows


def jsonl_bytes(rows: list, gz: bool = False) -> bytes:
    # Rows may be raw strings, to write malformed lines verbatim.
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    return gzip.compress(text) if gz else text


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def good_c4_folder(root: Path) -> Path:
    write(root / "a.jsonl", jsonl_bytes(c4_rows(4, start=0)))
    write(root / "b.jsonl.gz", jsonl_bytes(c4_rows(3, start=10), gz=True))
    write(root / "sub" / "c.parquet", parquet_bytes(c4_rows(2, start=20)))
    return root


def load_error(root: Path, spec=C4, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_task_data(str(root), spec, progress=False, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- local folders


def test_local_folder_reads_all_formats_and_ignores_other_files(tmp_path):
    root = good_c4_folder(tmp_path / "c4")
    write(root / "_SUCCESS", b"")
    write(root / "c.parquet.crc", b"xx")
    write(root / "README.md", b"# notes")
    write(root / "_temporary" / "x.parquet", b"not parquet")  # Spark leftovers are never data

    data = load_task_data(str(root), C4, progress=False)

    assert [f.key for f in data.files] == ["a.jsonl", "b.jsonl.gz", "sub/c.parquet"]
    assert len(data.ignored) == 4
    assert len(data.records) == (4 + 3 + 2) * 3
    assert data.labels == ("NOT_BRIDGING", "BRIDGING")  # spec order for fixed label sets
    assert data.class_counts == {"NOT_BRIDGING": 18, "BRIDGING": 9}
    assert data.n_skipped == 0 and data.rejects == [] and data.n_downloaded == 0
    first = data.records[0]
    assert first == Record(
        id="p0-s0", problem_id="p0", inputs=("", "b = a + 0"), label="NOT_BRIDGING", split=None,
        source=str(root / "a.jsonl"), line=1,
    )
    parquet_rec = [r for r in data.records if r.source.endswith("c.parquet")][1]
    assert parquet_rec.inputs == ("a = 1 * 2", "b = a + 1") and parquet_rec.line == 2
    assert len(data.fingerprint) == 16


def test_file_uri_single_file_and_blank_lines(tmp_path):
    root = good_c4_folder(tmp_path / "c4")
    plain = load_task_data(str(root), C4, progress=False)
    as_uri = load_task_data(root.as_uri(), C4, progress=False)
    assert as_uri.fingerprint == plain.fingerprint
    assert [r.id for r in as_uri.records] == [r.id for r in plain.records]

    one = load_task_data(str(root / "a.jsonl"), C4, progress=False)
    assert [f.key for f in one.files] == ["a.jsonl"] and len(one.records) == 12

    # Blank lines are not records and do not shift line numbers.
    write(tmp_path / "blank" / "x.jsonl", b"\n" + jsonl_bytes(c4_rows(2)) + b"\n\n")
    blank = load_task_data(str(tmp_path / "blank"), C4, progress=False)
    assert len(blank.records) == 6 and blank.records[0].line == 2


def test_fingerprint_depends_on_content_and_mapping_not_location_or_mtime(tmp_path):
    a = good_c4_folder(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    os.utime(b / "a.jsonl", (1, 1))  # a different mtime must not matter
    fa = load_task_data(str(a), C4, progress=False).fingerprint
    assert load_task_data(str(b), C4, progress=False).fingerprint == fa

    rows = c4_rows(4)
    rows[0]["step_j"] = "b = a + 100"
    write(b / "a.jsonl", jsonl_bytes(rows))
    assert load_task_data(str(b), C4, progress=False).fingerprint != fa

    mapped = load_task_data(str(a), C4, progress=False, field_map={"id": "id"})
    assert mapped.fingerprint == fa  # identity mapping == no mapping
    renamed = tmp_path / "renamed"
    write(renamed / "a.jsonl", jsonl_bytes([{("uid" if k == "id" else k): v for k, v in r.items()} for r in c4_rows(4)]))
    assert load_task_data(str(renamed), C4, progress=False, field_map="id=uid").fingerprint != fa


def test_field_map_and_integer_labels(tmp_path):
    names = "INTEGER,FRACTION,RADICAL,SET"
    rows = [
        {"uid": f"r{i}", "qid": f"q{i}", "text": f"What is {i}/3?", "target": i % 3}
        for i in range(9)
    ]
    write(tmp_path / "c6" / "part.parquet", parquet_bytes(rows))
    data = load_task_data(
        str(tmp_path / "c6"), C6, progress=False,
        field_map="id=uid, problem_id=qid, problem=text, label=target", label_names=names,
    )
    # Open set: labels present in the data, sorted; SET has no records and is not a class.
    assert data.labels == ("FRACTION", "INTEGER", "RADICAL")
    assert data.records[1] == Record(
        id="r1", problem_id="q1", inputs=("What is 1/3?",), label="FRACTION", split=None,
        source=str(tmp_path / "c6" / "part.parquet"), line=2,
    )
    assert data.label_names == ("INTEGER", "FRACTION", "RADICAL", "SET")
    assert data.field_map["problem"] == "text" and data.field_map["split"] == "split"

    # Fixed label set with integer labels: 0/1 map through the names to the spec's labels.
    c4_int = [dict(r, label=1 if r["label"] == "BRIDGING" else 0) for r in c4_rows(3)]
    write(tmp_path / "c4" / "x.jsonl", jsonl_bytes(c4_int))
    c4 = load_task_data(str(tmp_path / "c4"), C4, progress=False, label_names=["NOT_BRIDGING", "BRIDGING"])
    assert c4.class_counts == {"NOT_BRIDGING": 6, "BRIDGING": 3}

    msg = load_error(tmp_path / "c4", C4)  # integers without names say how to fix it
    assert "x.jsonl:1: label is the integer 0 but no label names were given" in msg
    assert "--label-names" in msg


def test_parsers():
    assert parse_field_map("problem=text, label = target") == {"problem": "text", "label": "target"}
    assert parse_field_map("") == {} and parse_field_map(None) == {}
    assert parse_field_map({"label": "y"}) == {"label": "y"}
    with pytest.raises(ValueError, match="CANONICAL=NAME_IN_FILE"):
        parse_field_map("problem")
    assert parse_label_names("INTEGER, FRACTION") == ("INTEGER", "FRACTION")
    assert parse_label_names("") is None and parse_label_names(None) is None
    assert parse_label_names(["A", "B"]) == ("A", "B")
    with pytest.raises(ValueError, match="repeated: A"):
        parse_label_names("A,B,A")
    with pytest.raises(ValueError, match="unknown canonical field.*'lable'"):
        resolve_field_map(C6, "lable=target")
    # "problem" is a known field for C4 too (the contract allows it there), so it is not an error.
    assert resolve_field_map(C4, "problem=text")["step_i"] == "step_i"


# ----------------------------------------------------------------------------- validation


BAD_LINES = [
    # (line written as line 2 of bad.jsonl, expected reason fragment)
    ('{"problem_id": "p1", "step_i": "a", "step_j": "b", "label": "BRIDGING"', "malformed JSON"),
    ("[1, 2]", "expected a JSON object per line, got list"),
    ({"problem_id": "p1", "step_i": "a", "label": "BRIDGING"}, "missing field 'step_j'; the record has: problem_id, step_i, label"),
    ({"problem_id": "p1", "step_i": "a", "step_j": "  ", "label": "BRIDGING"}, "empty field 'step_j'"),
    ({"problem_id": "p1", "step_i": "a", "step_j": 42, "label": "BRIDGING"}, "field 'step_j' must be a string, got int"),
    ({"step_i": "a", "step_j": "b", "label": "BRIDGING"}, "missing field 'problem_id' (required for every task"),
    ({"problem_id": "", "step_i": "a", "step_j": "b", "label": "BRIDGING"}, "empty field 'problem_id'"),
    ({"problem_id": "p1", "step_i": "a", "step_j": "b"}, "missing field 'label'"),
    ({"problem_id": "p1", "step_i": "a", "step_j": "b", "label": "BRIDGING", "split": "holdout"}, "unknown split 'holdout'"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES, ids=[r.split(" ")[0] + str(i) for i, (_, r) in enumerate(BAD_LINES)])
def test_each_validation_error_names_file_line_and_reason(tmp_path, bad, reason):
    root = tmp_path / "c4"
    write(root / "good.jsonl", jsonl_bytes(c4_rows(3)))
    bad_file = write(root / "bad.jsonl", jsonl_bytes([c4_rows(1)[0], bad, c4_rows(1)[1]]))
    msg = load_error(root)
    assert f"{bad_file}:2: {reason}" in msg, msg
    assert msg.startswith("1 bad record(s) in 1 file(s)")
    assert "on_error=\"skip\"" in msg  # says what to do


def test_empty_step_i_is_allowed_for_c4_only_where_the_spec_says(tmp_path):
    write(tmp_path / "a.jsonl", jsonl_bytes(c4_rows(2)))  # every first step has step_i == ""
    assert len(load_task_data(str(tmp_path), C4, progress=False).records) == 6
    c5 = get_task("c5")  # C5 pairs always have both steps
    rows = [dict(r, label="DEPENDS" if r["label"] == "BRIDGING" else "INDEPENDENT") for r in c4_rows(2)]
    write(tmp_path / "a.jsonl", jsonl_bytes(rows))
    assert f"{tmp_path / 'a.jsonl'}:1: empty field 'step_i'" in load_error(tmp_path, c5)


def test_unknown_labels_are_grouped_with_counts_and_first_lines(tmp_path):
    rows: list = c4_rows(3)
    rows[1]["label"] = "bridging"
    rows[4]["label"] = "bridging"
    rows[7]["label"] = "bridging"
    rows[8]["label"] = "MAYBE"
    f = write(tmp_path / "a.jsonl", jsonl_bytes(rows))
    msg = load_error(tmp_path)
    assert msg.startswith("4 bad record(s) in 1 file(s)") and "unknown label: 4" in msg
    assert (
        f"unknown label 'bridging': 3 record(s), first at {f}:2, {f}:5, {f}:8 "
        "(task c4 expects NOT_BRIDGING, BRIDGING); did you mean 'BRIDGING'?"
    ) in msg
    assert f"unknown label 'MAYBE': 1 record(s), first at {f}:9" in msg


def test_errors_are_collected_across_files_up_to_a_limit(tmp_path):
    write(tmp_path / "a.jsonl", jsonl_bytes(c4_rows(2) + ["{oops"] * 15))
    write(tmp_path / "b.jsonl", jsonl_bytes(["{oops"] * 15 + c4_rows(2)))
    msg = load_error(tmp_path)
    assert msg.startswith("30 bad record(s) in 2 file(s)")
    entries = [ln for ln in msg.splitlines() if ln.startswith("  ") and "malformed JSON" in ln]
    assert len(entries) == 20
    assert f"{tmp_path / 'a.jsonl'}:7: malformed JSON" in msg and f"{tmp_path / 'b.jsonl'}:5: malformed JSON" in msg
    assert "... and 10 more problem(s) not shown (first 20 listed)" in msg
    assert "more problem(s)" not in load_error(tmp_path, max_errors=50)


def test_empty_prefix_says_what_was_listed_and_suggests_demo(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = load_error(tmp_path / "empty")
    assert "no data files under" in msg and "nothing is there" in msg and "mycelium data demo" in msg
    write(tmp_path / "meta" / "_SUCCESS", b"")
    write(tmp_path / "meta" / "data.csv", b"a,b")
    msg = load_error(tmp_path / "meta")
    assert "listed 2 object(s) (_SUCCESS, data.csv), none a data file (.jsonl, .jsonl.gz, .parquet)" in msg


def test_one_class_is_refused_in_both_modes(tmp_path):
    rows = [dict(r, label="NOT_BRIDGING") for r in c4_rows(3)]
    write(tmp_path / "a.jsonl", jsonl_bytes(rows + ["not json"]))
    msg = load_error(tmp_path, on_error="skip")  # skipping the bad line leaves one class
    assert "cannot train task c4" in msg and "class(es) missing: BRIDGING (present: NOT_BRIDGING)" in msg
    write(tmp_path / "a.jsonl", jsonl_bytes(rows))
    assert "class(es) missing: BRIDGING" in load_error(tmp_path)

    c6_rows = [{"problem_id": f"q{i}", "problem": "x", "label": "INTEGER"} for i in range(4)]
    write(tmp_path / "c6" / "a.jsonl", jsonl_bytes(c6_rows))
    msg = load_error(tmp_path / "c6", C6, label_names="INTEGER,FRACTION")
    assert "only 1 class present (INTEGER); a classifier needs at least two; label names without records: FRACTION" in msg
    # stats turns the check off to report instead of failing
    assert load_task_data(str(tmp_path / "c6"), C6, progress=False, check_classes=False).class_counts == {"INTEGER": 4}


def test_skip_mode_counts_and_keeps_rejects(tmp_path):
    rows: list = c4_rows(3)
    rows.insert(2, "{broken")
    rows.insert(5, {"problem_id": "p9", "step_i": "a", "step_j": "b", "label": "WHAT"})
    f = write(tmp_path / "a.jsonl", jsonl_bytes(rows))
    write(tmp_path / "z.jsonl.gz", b"\x1f\x8bnot really gzip")
    data = load_task_data(str(tmp_path), C4, progress=False, on_error="skip")
    assert len(data.records) == 9 and data.n_skipped == 2 and data.n_unreadable_files == 1  # a file is not "1 record"
    assert data.summary()["data_skipped"] == 2 and data.summary()["data_unreadable_files"] == 1
    assert "an unknown number of records lost" in data.rejects[2]["reason"]
    assert [(r["file"], r["line"], r["kind"]) for r in data.rejects] == [
        (str(f), 3, "malformed_json"),
        (str(f), 6, "unknown_label"),
        (str(tmp_path / "z.jsonl.gz"), 0, "unreadable_file"),
    ]
    assert data.rejects[0]["raw"] == "{broken"
    out = tmp_path / "out" / "rejects.jsonl"
    write_rejects_jsonl(data.rejects, out)
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert [b["line"] for b in back] == [3, 6, 0] and set(back[1]) == {"file", "line", "kind", "reason", "raw"}
    assert back[2]["records"] is None  # unknown, and said so
    assert "unknown label 'WHAT'" in back[1]["reason"]
    # the same data fails by default, naming the unreadable file
    assert f"{tmp_path / 'z.jsonl.gz'}: unreadable file" in load_error(tmp_path)


def test_skip_mode_recovers_the_readable_part_of_a_damaged_gzip_and_counts_what_is_lost(tmp_path):
    import gzip

    rows = c4_rows(50)  # 150 records
    body = gzip.compress(jsonl_bytes(rows), compresslevel=6)
    write(tmp_path / "cut" / "a.jsonl.gz", body[: len(body) * 2 // 3])  # a truncated upload
    data = load_task_data(str(tmp_path / "cut"), C4, progress=False, on_error="skip")
    assert 0 < len(data.records) < 150  # what was written before the cut is trained on
    assert [r.line for r in data.records] == list(range(1, len(data.records) + 1))  # whole lines only, in order
    assert data.n_unreadable_files == 1 and data.n_skipped == 0  # the lost count is unknown: not guessed
    (reject,) = data.rejects
    assert reject["line"] == 0 and reject["records"] is None
    assert f"truncated gzip file (its end is missing); {len(data.records)} record(s) before the damage were read" in reject["reason"]
    msg = load_error(tmp_path / "cut")  # fail mode names the file and says what happened
    assert f"0 bad record(s) and 1 unreadable file(s) in 1 file(s)" in msg and "truncated gzip" in msg

    # A Parquet file whose pages are damaged but whose footer is intact states its record count.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([dict(r, split="train") for r in rows])
    pq.write_table(table, tmp_path / "ok.parquet", compression="none")
    raw = bytearray((tmp_path / "ok.parquet").read_bytes())
    raw[8:400] = b"\xff" * 392  # the first pages
    write(tmp_path / "pq" / "a.parquet", bytes(raw))
    write(tmp_path / "pq" / "b.jsonl", jsonl_bytes(c4_rows(3)))
    data = load_task_data(str(tmp_path / "pq"), C4, progress=False, on_error="skip")
    assert len(data.records) == 9 and data.n_unreadable_files == 1 and data.n_skipped == 150
    assert data.rejects[0]["records"] == 150 and "150 record(s) lost" in data.rejects[0]["reason"]


def test_missing_id_is_derived_from_file_and_line(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in c4_rows(2)]
    write(tmp_path / "d" / "a.jsonl", jsonl_bytes(rows))
    data = load_task_data(str(tmp_path), C4, progress=False)
    assert [r.id for r in data.records[:2]] == ["d/a.jsonl:1", "d/a.jsonl:2"]


def test_on_error_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_error must be 'fail' or 'skip'"):
        load_task_data(str(tmp_path), C4, on_error="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- S3 (real SeaweedFS)


@pytest.fixture
def s3_prefix(stack) -> str:
    return f"s3://mycelium-data/tests/{uuid.uuid4().hex}/"


def put(uri: str, data: bytes) -> None:
    storage.write_bytes(uri, data)


def test_s3_lists_past_1000_keys_and_second_load_downloads_nothing(s3_prefix, tmp_path):
    n = 1005
    rows = c4_rows(n, steps=2)  # one problem per file, both classes in each

    def upload(i: int) -> None:
        put(f"{s3_prefix}part-{i:05d}.jsonl", jsonl_bytes(rows[2 * i : 2 * i + 2]))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(upload, range(n)))
    put(f"{s3_prefix}_SUCCESS", b"")

    assert len(storage.list_objects(s3_prefix)) == n + 1  # more than one listing page
    cache = tmp_path / "cache"
    first = load_task_data(s3_prefix, C4, cache_dir=cache, progress=False)
    assert len(first.files) == n and len(first.records) == 2 * n
    assert first.n_downloaded == n and first.n_cached == 0 and first.ignored == [f"{s3_prefix}_SUCCESS"]
    assert first.records[-1].source == f"{s3_prefix}part-01004.jsonl"

    second = load_task_data(s3_prefix.rstrip("/"), C4, cache_dir=cache, progress=False)
    assert second.n_downloaded == 0 and second.bytes_downloaded == 0 and second.n_cached == n
    assert second.fingerprint == first.fingerprint and second.records == first.records

    # the same bytes in a local folder have the same fingerprint (content MD5 == single-part ETag)
    for i in range(n):
        write(tmp_path / "local" / f"part-{i:05d}.jsonl", jsonl_bytes(rows[2 * i : 2 * i + 2]))
    assert load_task_data(str(tmp_path / "local"), C4, progress=False).fingerprint == first.fingerprint


def test_s3_changed_object_is_fetched_again(s3_prefix, tmp_path):
    put(f"{s3_prefix}a.jsonl", jsonl_bytes(c4_rows(2)))
    put(f"{s3_prefix}b.jsonl", jsonl_bytes(c4_rows(2, start=5)))
    cache = tmp_path / "cache"
    first = load_task_data(s3_prefix, C4, cache_dir=cache, progress=False)
    assert first.n_downloaded == 2

    changed = c4_rows(2)
    changed[0]["step_j"] = "c = 60 * b"
    put(f"{s3_prefix}a.jsonl", jsonl_bytes(changed))
    second = load_task_data(s3_prefix, C4, cache_dir=cache, progress=False)
    assert second.n_downloaded == 1 and second.n_cached == 1
    assert second.records[0].inputs == ("", "c = 60 * b")
    assert second.fingerprint != first.fingerprint
    etag_a = {f.key: f.etag for f in second.files}["a.jsonl"]
    cached = sorted(p.name for p in cache.rglob("a.jsonl@*"))
    assert cached == [f"a.jsonl@{etag_a}"]  # the stale copy was removed


def test_s3_validation_errors_and_skip_mode(s3_prefix, tmp_path):
    rows: list = c4_rows(3)
    rows[3] = {"problem_id": "p1", "step_i": "a", "step_j": None, "label": "BRIDGING"}
    rows[5] = "{nope"
    put(f"{s3_prefix}x/bad.jsonl", jsonl_bytes(rows))
    put(f"{s3_prefix}x/good.parquet", parquet_bytes(c4_rows(2, start=10)))
    with pytest.raises(DataError) as info:
        load_task_data(s3_prefix, C4, cache_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert f"{s3_prefix}x/bad.jsonl:4: missing field 'step_j'" in msg
    assert f"{s3_prefix}x/bad.jsonl:6: malformed JSON" in msg

    data = load_task_data(s3_prefix, C4, cache_dir=tmp_path, progress=False, on_error="skip")
    assert data.n_skipped == 2 and len(data.records) == 9 - 2 + 6 and data.n_downloaded == 0
    out = f"{s3_prefix}runs/rejects.jsonl"
    write_rejects_jsonl(data.rejects, out)
    back = [json.loads(x) for x in storage.read_bytes(out).decode().splitlines()]
    assert [(b["line"], b["kind"]) for b in back] == [(4, "missing_field"), (6, "malformed_json")]


def test_s3_parquet_gz_field_map_and_prefix_boundary(s3_prefix, tmp_path):
    names = ["INTEGER", "FRACTION", "RADICAL"]
    pq_rows = [{"qid": f"q{i}", "text": f"problem {i}", "target": i % 3} for i in range(6)]
    gz_rows = [{"qid": f"g{i}", "text": f"problem g{i}", "target": names[i % 2]} for i in range(4)]
    put(f"{s3_prefix}c6/a.parquet", parquet_bytes(pq_rows))
    put(f"{s3_prefix}c6/b.jsonl.gz", jsonl_bytes(gz_rows, gz=True))
    put(f"{s3_prefix}c6_old/zzz.jsonl", b"{broken\n")  # a sibling prefix must not be listed
    data = load_task_data(
        f"{s3_prefix}c6", C6, cache_dir=tmp_path, progress=False,
        field_map="problem_id=qid,problem=text,label=target", label_names=",".join(names),
    )
    assert [f.key for f in data.files] == ["a.parquet", "b.jsonl.gz"]
    assert data.class_counts == {"FRACTION": 4, "INTEGER": 4, "RADICAL": 2}
    assert data.records[0].id == "a.parquet:1" and data.records[-1].inputs == ("problem g3",)


def test_s3_empty_prefix_suggests_demo(s3_prefix):
    with pytest.raises(DataError, match=r"no data files under s3://.*nothing is there.*mycelium data demo"):
        load_task_data(s3_prefix, C4, progress=False)


# ----------------------------------------------------------------------------- stats


def test_stats_report_describes_bad_data_instead_of_failing(tmp_path):
    import io

    from rich.console import Console

    from mycelium.data.stats import print_stats, stats_report

    rows = [dict(r, label="NOT_BRIDGING") for r in c4_rows(5)] + ["{bad"]
    write(tmp_path / "a.jsonl", jsonl_bytes(rows))
    report = stats_report(str(tmp_path), C4)
    json.dumps(report)  # serialisable, so the CLI can also print it as JSON
    assert report["n_records"] == 15 and report["n_skipped"] == 1 and report["n_problems"] == 5
    assert report["class_counts"] == {"NOT_BRIDGING": 15, "BRIDGING": 0}
    assert report["class_percent"]["NOT_BRIDGING"] == 100.0
    assert report["reject_kinds"] == {"malformed_json": 1} and report["rejects_sample"][0]["line"] == 16
    assert "class(es) missing: BRIDGING" in report["class_problem"]
    out = io.StringIO()
    print_stats(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "cannot train" in text and "malformed_json" in text and report["fingerprint"] in text
