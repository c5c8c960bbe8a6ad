"""Load task records from S3, a local folder or a ``file://`` URI, validated against a ``TaskSpec``.

What this module guarantees (the data contract):

- Every data file under the prefix is read (all listing pages), whatever its size or number.
- S3 objects are downloaded in parallel into a local cache keyed by bucket, key and ETag, so a
  second load of unchanged data downloads nothing and a rewritten object is fetched again.
- A bad record is never silently dropped: by default every problem is collected (file:line and
  what is wrong) and raised as one ``DataError`` before any training starts; the opt-in
  ``on_error="skip"`` mode keeps going but counts and returns every rejected line.
- The result carries a fingerprint of exactly what was read, so caches, tracking tags and the
  model registry can tell whether two runs saw the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from tqdm.auto import tqdm

from mycelium import storage
from mycelium.storage import ObjectInfo
from mycelium.tasks import TaskSpec

log = logging.getLogger(__name__)

DATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".parquet")
# Split names accepted in a record's ``split`` field, mapped to the three canonical ones.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}
# Fields every task knows besides its input fields; ``problem`` is listed because the contract
# allows it in C4 files, so a shared ``--field-map`` naming it is not a typo for C4.
BASE_FIELDS: tuple[str, ...] = ("id", "problem_id", "label", "split")
KNOWN_FIELDS: tuple[str, ...] = BASE_FIELDS + ("problem", "step_i", "step_j")
# A rejected line is kept for the rejects artifact; cap its size so one giant line cannot bloat it.
MAX_RAW_CHARS = 4000
DEFAULT_MAX_ERRORS = 20
# Objects up to this size are fetched with a single GET; larger ones with boto3's transfer manager.
SMALL_OBJECT_BYTES = 64 * 1024 * 1024
_FIX_HINT = (
    "What to do: fix or remove these records; if the files use other field names pass a field "
    "map (field_map / --field-map \"problem=text,label=target\"); for integer labels pass "
    "label_names (--label-names \"A,B,...\"); or pass on_error=\"skip\" (--on-error skip) to skip "
    "bad records and log them as a rejects artifact."
)

OnError = Literal["fail", "skip"]


class DataError(ValueError):
    """Data that cannot be trained on; the message names files, lines and what to do."""


@dataclass(frozen=True)
class Record:
    """One normalised record, whatever the file's field names and label encoding were."""

    id: str
    problem_id: str
    inputs: tuple[str, ...]  # in the task's ``input_fields`` order
    label: str
    split: str | None  # "train" | "val" | "test" | None (then the split is a hash of problem_id)
    source: str  # URI (or local path) of the file the record came from
    line: int  # 1-based line (JSONL) or row (Parquet) in ``source``


@dataclass
class LoadedData:
    """Validated records plus everything a run should log about where they came from."""

    uri: str
    records: list[Record]
    # Fixed label sets keep the spec's order (index 0 is the majority class for C4/C5); open
    # sets (C6) are the sorted labels present in the data, so the order is reproducible.
    labels: tuple[str, ...]
    fingerprint: str
    # The files read, sorted by key; ``etag`` is the S3 ETag or, for local files, the MD5 of the
    # content (which equals the S3 ETag of a single-part upload of the same bytes).
    files: list[ObjectInfo]
    n_skipped: int  # records dropped, counted (a damaged file's lost records only when it states them)
    rejects: list[dict[str, Any]]
    class_counts: dict[str, int]
    field_map: dict[str, str]
    label_names: tuple[str, ...] | None = None
    ignored: list[str] = field(default_factory=list)  # listed objects that are not data files
    n_downloaded: int = 0  # objects fetched from S3 by this load (0 when all were cached)
    n_cached: int = 0  # S3 objects served from the local cache
    bytes_downloaded: int = 0
    n_unreadable_files: int = 0  # files that could not be decoded to their end (their rejects have line 0)

    def summary(self) -> dict[str, Any]:
        """Flat values suitable for tracking params/tags."""
        return {
            "data_uri": self.uri,
            "data_fingerprint": self.fingerprint,
            "data_files": len(self.files),
            "data_records": len(self.records),
            "data_skipped": self.n_skipped,
            "data_unreadable_files": self.n_unreadable_files,
            "labels": ",".join(self.labels),
        }


# --------------------------------------------------------------------------------------------
# Parameters as strings (CLI / MLproject)
# --------------------------------------------------------------------------------------------


def parse_field_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"problem=text,label=target"`` -> ``{"problem": "text", "label": "target"}``.

    Keys are canonical field names, values the names used in the files. ``None`` or ``""``
    mean "no mapping" so an MLproject parameter can default to an empty string.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    out: dict[str, str] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        canonical, sep, in_file = part.partition("=")
        canonical, in_file = canonical.strip(), in_file.strip()
        if not sep or not canonical or not in_file:
            raise ValueError(
                f"field map entry {part!r} must look like CANONICAL=NAME_IN_FILE, "
                f"e.g. \"problem=text,label=target\""
            )
        if canonical in out and out[canonical] != in_file:
            raise ValueError(f"field map names {canonical!r} twice ({out[canonical]!r} and {in_file!r})")
        out[canonical] = in_file
    return out


def parse_label_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"INTEGER,FRACTION"`` -> ``("INTEGER", "FRACTION")``: integer label ``i`` means name ``i``.

    ``None`` or ``""`` mean labels are already names.
    """
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    if not names:
        return None
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"label names must be unique; repeated: {', '.join(dupes)}")
    return tuple(names)


def resolve_field_map(spec: TaskSpec, field_map: str | Mapping[str, str] | None) -> dict[str, str]:
    """The full canonical -> in-file name mapping for ``spec`` (identity where not overridden)."""
    overrides = parse_field_map(field_map)
    canonical = tuple(dict.fromkeys(BASE_FIELDS + spec.input_fields))
    allowed = set(KNOWN_FIELDS) | set(canonical)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        # A typo here would otherwise surface as thousands of "missing field" errors.
        raise ValueError(
            f"field map for task {spec.name}: unknown canonical field(s) {', '.join(map(repr, unknown))}; "
            f"the task reads {', '.join(canonical)} (write CANONICAL=NAME_IN_FILE)"
        )
    return {name: overrides.get(name, name) for name in canonical}


def default_cache_dir() -> Path:
    """``$MYCELIUM_CACHE/data`` if set, else ``~/.cache/mycelium/data``.

    ``MYCELIUM_CACHE`` is the root of all mycelium caches (data here, features elsewhere), so a
    single variable moves them all, e.g. to a scratch disk.
    """
    root = os.environ.get("MYCELIUM_CACHE")
    return Path(root).expanduser() / "data" if root else Path.home() / ".cache" / "mycelium" / "data"


# --------------------------------------------------------------------------------------------
# Listing and fetching
# --------------------------------------------------------------------------------------------


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def _is_hidden(key: str) -> bool:
    # Hadoop/Spark convention: names starting with "_" or "." are metadata (_SUCCESS,
    # _temporary/, .part-0.crc), never data, even if they end in .parquet.
    return any(part.startswith(("_", ".")) for part in key.split("/") if part)


def _rel_key(info: ObjectInfo) -> str:
    # Listing a single object by its full key leaves an empty relative key; use its name.
    return info.key or info.uri.rstrip("/").rsplit("/", 1)[-1]


def _normalise_uri(uri: str) -> str:
    uri = uri.strip()
    if storage.is_s3(uri) and not uri.endswith("/") and not is_data_file(uri):
        # "s3://b/c4" must not also list "s3://b/c4_old/..." or "s3://b/c40/...".
        uri += "/"
    return uri


def list_data_files(uri: str) -> tuple[list[ObjectInfo], list[ObjectInfo], list[ObjectInfo]]:
    """(data files, ignored objects, everything listed) under ``uri``, each sorted by key."""
    uri = _normalise_uri(uri)
    listed = storage.list_objects(uri)
    if storage.is_s3(uri) and is_data_file(uri):
        # A single object: the prefix listing may also return "x.jsonl.gz" for "x.jsonl".
        listed = [o for o in listed if o.uri == uri]
    data, ignored = [], []
    for info in listed:
        key = _rel_key(info)
        (data if is_data_file(key) and not _is_hidden(info.key) else ignored).append(info)
    if ignored:
        # Metadata (_SUCCESS, .crc, hidden folders) is expected; anything else might be data in a
        # format we do not read (.json, .csv), so say so louder.
        odd = [o for o in ignored if not (_is_hidden(o.key) or o.key.endswith(".crc"))]
        names = ", ".join(_rel_key(o) for o in (odd or ignored)[:10])
        more = f" and {len(odd or ignored) - 10} more" if len(odd or ignored) > 10 else ""
        if odd:
            log.warning(
                "ignoring %d object(s) under %s that are not %s: %s%s",
                len(odd), uri, " / ".join(DATA_SUFFIXES), names, more,
            )
        else:
            log.info("ignoring %d metadata object(s) under %s: %s%s", len(ignored), uri, names, more)
    return data, ignored, listed


def _cache_path(cache_dir: Path, info: ObjectInfo) -> Path:
    bucket, key = storage.split_s3(info.uri)
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        # Keys like "a//b" or "../x" are legal in S3 but would escape or collide on disk.
        parts = ["_hashed", hashlib.sha256(key.encode()).hexdigest()]
    safe_etag = re.sub(r"[^0-9A-Za-z_-]", "_", info.etag)
    return cache_dir.joinpath("s3", bucket, *parts[:-1], f"{parts[-1]}@{safe_etag}")


def _drop_stale(fresh: Iterable[Path]) -> None:
    """Remove cached copies of the same keys with an older ETag (best effort; keeps disk bounded).

    One directory listing per folder, not per file: a prefix of thousands of keys in one folder
    would otherwise cost a quadratic number of directory entries.
    """
    by_dir: dict[Path, set[str]] = {}
    for dest in fresh:
        by_dir.setdefault(dest.parent, set()).add(dest.name)
    for folder, names in by_dir.items():
        keep_keys = {n.rpartition("@")[0]: n for n in names}
        try:
            for entry in os.scandir(folder):
                key, at, etag = entry.name.rpartition("@")
                if at and key in keep_keys and entry.name != keep_keys[key] and re.fullmatch(r"[0-9A-Za-z_-]+", etag):
                    os.unlink(entry.path)
        except OSError:
            pass


def _download_one(info: ObjectInfo, dest: Path) -> int:
    # A unique temporary name: several processes (torchrun ranks, parallel jobs) may fetch the
    # same object at once, and os.replace makes whichever finishes last win atomically.
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        if info.size <= SMALL_OBJECT_BYTES:
            # One GET: boto3's download_file adds a HEAD and a transfer manager per call, which
            # dominates for the many small files a data prefix usually holds (~10x slower).
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(storage.read_bytes(info.uri))
        else:
            storage.download(info.uri, tmp)  # multipart, parallel ranges for big objects
        size = tmp.stat().st_size
        if size != info.size:
            raise OSError(f"downloaded {size} bytes of {info.uri}, listing said {info.size}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def fetch_files(
    files: Sequence[ObjectInfo],
    cache_dir: Path | str | None = None,
    *,
    workers: int = 16,
    progress: bool = True,
) -> tuple[list[Path], int, int]:
    """Local paths for ``files`` (S3 objects via the ETag-keyed cache, local files in place).

    Returns (paths in the order of ``files``, number downloaded, bytes downloaded).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    paths: list[Path] = []
    todo: list[tuple[ObjectInfo, Path]] = []
    for info in files:
        if storage.is_s3(info.uri):
            dest = _cache_path(cache, info)
            paths.append(dest)
            if not dest.is_file():
                todo.append((info, dest))
        else:
            paths.append(storage.local_path(info.uri))
    if not todo:
        return paths, 0, 0
    log.info("downloading %d of %d object(s) into %s", len(todo), len(files), cache)
    storage.s3_client()  # create the client here: boto3 client creation is not thread-safe
    n_bytes = 0
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool, tqdm(
        total=len(todo), unit="file", desc="download", disable=None if progress else True
    ) as bar:
        futures = {pool.submit(_download_one, info, dest): info for info, dest in todo}
        for fut in as_completed(futures):
            n_bytes += fut.result()  # re-raises the first failure with its traceback
            bar.update(1)
    _drop_stale(dest for _, dest in todo)
    return paths, len(todo), n_bytes


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


class _RowError(Exception):
    def __init__(self, kind: str, reason: str, value: Any = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.value = value  # the offending label, for grouping unknown labels


def _truncate(raw: str) -> str:
    return raw if len(raw) <= MAX_RAW_CHARS else raw[:MAX_RAW_CHARS] + "...[truncated]"


@dataclass(frozen=True)
class _Damage:
    """Why a file cannot be read to its end, and how many records it holds if known."""

    reason: str
    records: int | None = None


def _gunzip(data: bytes) -> tuple[bytes, str | None]:
    """The decodable part of a gzip file and why decoding stopped early (None: all of it).

    Not ``gzip.decompress``: it returns nothing for a truncated or damaged file, while every line
    before the damage is still good data. Fed in chunks so the part before a bad block is kept."""
    out: list[bytes] = []
    rest = data
    while rest:  # a file may hold several gzip members back to back
        d = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            for start in range(0, len(rest), 1 << 16):
                out.append(d.decompress(rest[start : start + (1 << 16)]))
                if d.eof:
                    break
            out.append(d.flush())
        except zlib.error as e:
            return b"".join(out), f"damaged gzip data ({e})"
        if not d.eof:
            return b"".join(out), "truncated gzip file (its end is missing)"
        rest = d.unused_data
    return b"".join(out), None


def _parquet_rows(data: bytes) -> int | None:
    """The row count a Parquet footer states, when the footer can be read."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except Exception:  # noqa: BLE001 - no footer: the count is unknown
        return None


def _read_rows(data: bytes, name: str) -> tuple[list[tuple[int, str, Any]], _Damage | None]:
    """(line, raw text, parsed object or _RowError) for every readable record of one file, and
    what made the rest unreadable (None: the whole file was read)."""
    if name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - a damaged Parquet file has no readable part
            return [], _Damage(f"unreadable Parquet file: {type(e).__name__}: {e}", _parquet_rows(data))
        rows = [(i, _truncate(json.dumps(row, default=str, ensure_ascii=False)), row) for i, row in enumerate(table.to_pylist(), start=1)]
        return rows, None
    damage = None
    if data[:2] == b"\x1f\x8b":
        # Sniff gzip instead of trusting the suffix: ".jsonl" files are sometimes compressed.
        data, why = _gunzip(data)
        if why is not None:
            data = data[: data.rfind(b"\n") + 1]  # the last line was cut by the damage: not a record
            damage = _Damage(why)
    return list(_iter_lines(data)), damage


def _iter_lines(data: bytes) -> Iterator[tuple[int, str, Any]]:
    for i, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        raw = _truncate(line.decode("utf-8", errors="replace").rstrip("\r"))
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, raw, _RowError("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})")
            continue
        except UnicodeDecodeError as e:
            yield i, raw, _RowError("malformed_json", f"malformed JSON: not UTF-8 ({e.reason} at byte {e.start})")
            continue
        if not isinstance(obj, dict):
            yield i, raw, _RowError("malformed_json", f"expected a JSON object per line, got {type(obj).__name__}")
            continue
        yield i, raw, obj


def _field_label(canonical: str, fmap: Mapping[str, str]) -> str:
    in_file = fmap[canonical]
    return repr(canonical) if in_file == canonical else f"{canonical!r} (file field {in_file!r})"


def _missing(canonical: str, fmap: Mapping[str, str], obj: Mapping[str, Any], extra: str = "") -> _RowError:
    keys = ", ".join(map(str, list(obj)[:12])) or "none"
    return _RowError(
        "missing_field",
        f"missing field {_field_label(canonical, fmap)}{extra}; the record has: {keys}",
    )


def _as_id(canonical: str, value: Any, fmap: Mapping[str, str]) -> str:
    # Ids are often integers in exported data; accept them (and integral floats, which is what
    # pandas makes of an int column with a null), but not bools or fractional floats.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(
            "non_string",
            f"field {_field_label(canonical, fmap)} must be a string or integer, got {type(value).__name__} ({value!r:.60})",
        )
    return str(value).strip()


class _Normaliser:
    """Turns one parsed row into a ``Record`` or raises ``_RowError`` naming what is wrong."""

    def __init__(self, spec: TaskSpec, fmap: Mapping[str, str], label_names: tuple[str, ...] | None) -> None:
        self.spec = spec
        self.fmap = fmap
        self.label_names = label_names
        self.fixed = set(spec.labels)

    def label(self, value: Any) -> str:
        names = self.label_names
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Parquet/pandas exports turn int columns with nulls into floats
        if isinstance(value, bool):
            raise _RowError("bad_label", f"label must be a class name or integer, got bool ({value})")
        if isinstance(value, int):
            if names is None:
                raise _RowError(
                    "bad_label",
                    f"label is the integer {value} but no label names were given; pass label_names "
                    f"(--label-names \"NAME0,NAME1,...\") to map integers to class names",
                )
            if not 0 <= value < len(names):
                raise _RowError(
                    "bad_label", f"integer label {value} is out of range for {len(names)} label names ({', '.join(names)})"
                )
            value = names[value]
        elif isinstance(value, str):
            value = value.strip()
            if names is not None and value not in names and re.fullmatch(r"\d+", value):
                idx = int(value)  # "3" in a CSV-converted file
                if idx >= len(names):
                    raise _RowError("bad_label", f"integer label {idx} is out of range for {len(names)} label names")
                value = names[idx]
        else:
            raise _RowError("bad_label", f"label must be a class name or integer, got {type(value).__name__} ({value!r:.60})")
        if not value:
            raise _RowError("empty_field", f"empty field {_field_label('label', self.fmap)}")
        if self.fixed and value not in self.fixed:
            raise _RowError("unknown_label", f"unknown label {value!r} (expected one of {', '.join(self.spec.labels)})", value)
        return value

    def __call__(self, obj: Mapping[str, Any], rel_key: str, source: str, line: int) -> Record:
        fm = self.fmap
        pid = obj.get(fm["problem_id"])
        if pid is None:
            raise _missing(
                "problem_id", fm, obj,
                " (required for every task: the train/validation split keeps a problem's records together)",
            )
        problem_id = _as_id("problem_id", pid, fm)
        if not problem_id:
            raise _RowError("empty_field", f"empty field {_field_label('problem_id', fm)}")

        inputs: list[str] = []
        for name in self.spec.input_fields:
            value = obj.get(fm[name])
            if value is None:
                raise _missing(name, fm, obj)
            if not isinstance(value, str):
                raise _RowError(
                    "non_string", f"field {_field_label(name, fm)} must be a string, got {type(value).__name__} ({value!r:.60})"
                )
            if not value.strip() and name not in self.spec.allow_empty:
                raise _RowError("empty_field", f"empty field {_field_label(name, fm)} (task {self.spec.name} needs text here)")
            inputs.append(value)

        raw_label = obj.get(fm["label"])
        if raw_label is None:
            raise _missing("label", fm, obj)
        label = self.label(raw_label)

        split: str | None = None
        raw_split = obj.get(fm["split"])
        if raw_split is not None and raw_split != "":
            if not isinstance(raw_split, str) or raw_split.strip().lower() not in SPLIT_ALIASES:
                raise _RowError(
                    "bad_split", f"unknown split {raw_split!r} (expected train, val or test; validation and dev mean val)"
                )
            split = SPLIT_ALIASES[raw_split.strip().lower()]

        raw_id = obj.get(fm["id"])
        rid = _as_id("id", raw_id, fm) if raw_id is not None else ""
        # Derived ids use the key relative to the prefix, so they are the same on every machine.
        return Record(
            id=rid or f"{rel_key}:{line}",
            problem_id=problem_id,
            inputs=tuple(inputs),
            label=label,
            split=split,
            source=source,
            line=line,
        )


# --------------------------------------------------------------------------------------------
# Fingerprint and error reporting
# --------------------------------------------------------------------------------------------


def fingerprint(
    files: Iterable[ObjectInfo],
    field_map: Mapping[str, str],
    label_names: Sequence[str] | None = None,
    input_fields: Sequence[str] = (),
) -> str:
    """16 hex chars of sha256 over the sorted (key, etag) pairs and the field/label mapping.

    Keys are relative to the loaded prefix and local files use a content hash (not mtime), so a
    copy of the same files has the same fingerprint on any machine.
    """
    payload = {
        "files": sorted((_rel_key(f), f.etag) for f in files),
        "field_map": sorted(field_map.items()),
        "label_names": list(label_names) if label_names else None,
        "input_fields": list(input_fields),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_KIND_NAMES = {
    "malformed_json": "malformed JSON",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "non_string": "wrong type",
    "bad_label": "bad label",
    "unknown_label": "unknown label",
    "bad_split": "bad split",
    "unreadable_file": "unreadable file",
}


def _where(rej: Mapping[str, Any]) -> str:
    return f"{rej['file']}:{rej['line']}" if rej["line"] else str(rej["file"])


def format_rejects(rejects: Sequence[Mapping[str, Any]], uri: str, spec: TaskSpec, max_errors: int = DEFAULT_MAX_ERRORS) -> str:
    """The ``DataError`` message for bad records: a summary, file:line entries, and a fix hint."""
    kinds = Counter(r["kind"] for r in rejects)
    n_files = len({r["file"] for r in rejects})
    n_unreadable = kinds.get("unreadable_file", 0)
    by_kind = ", ".join(f"{_KIND_NAMES.get(k, k)}: {n}" for k, n in kinds.most_common())
    what = f"{len(rejects) - n_unreadable} bad record(s)" + (f" and {n_unreadable} unreadable file(s)" if n_unreadable else "")
    lines = [f"{what} in {n_files} file(s) under {uri} for task {spec.name} ({by_kind}):"]

    # Unknown labels are usually systematic (another label vocabulary, wrong case), so one entry
    # per distinct label with its count and first places reads better than thousands of lines.
    unknown: dict[Any, list[Mapping[str, Any]]] = {}
    others: list[str] = []
    for rej in rejects:
        if rej["kind"] == "unknown_label":
            unknown.setdefault(rej.get("value"), []).append(rej)
        else:
            others.append(f"  {_where(rej)}: {rej['reason']}")
    # Label groups first: they are few, and a cut-off list must not hide them.
    entries: list[str] = []
    for value, group in sorted(unknown.items(), key=lambda kv: -len(kv[1])):
        places = ", ".join(_where(r) for r in group[:3])
        matches = [lab for lab in spec.labels if lab.lower() == str(value).strip().lower()]
        hint = f"; did you mean {matches[0]!r}?" if matches else ""
        entries.append(
            f"  unknown label {value!r}: {len(group)} record(s), first at {places} "
            f"(task {spec.name} expects {', '.join(spec.labels)}){hint}"
        )
    entries.extend(others)
    lines.extend(entries[:max_errors])
    if len(entries) > max_errors:
        lines.append(f"  ... and {len(entries) - max_errors} more problem(s) not shown (first {max_errors} listed)")
    lines.append(_FIX_HINT)
    return "\n".join(lines)


def write_rejects_jsonl(rejects: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rejected lines (file, line, kind, reason, raw) as JSON Lines, locally or to S3."""
    body = "".join(
        json.dumps({k: r.get(k) for k in ("file", "line", "kind", "reason", "raw", *(("records",) if r["kind"] == "unreadable_file" else ()))},
                   ensure_ascii=False, default=str) + "\n"
        for r in rejects
    )
    storage.write_bytes(os.fspath(path), body.encode("utf-8"))


def class_problem(spec: TaskSpec, counts: Mapping[str, int], label_names: Sequence[str] | None) -> str | None:
    """Why these class counts cannot train a classifier, or None when they can."""
    present = [lab for lab, n in counts.items() if n > 0]
    if spec.labels:
        missing = [lab for lab in spec.labels if counts.get(lab, 0) == 0]
    else:
        missing = [lab for lab in (label_names or ()) if counts.get(lab, 0) == 0]
    if spec.labels and missing:
        return f"class(es) missing: {', '.join(missing)} (present: {', '.join(present) or 'none'})"
    if len(present) < 2:
        detail = f"; label names without records: {', '.join(missing)}" if missing else ""
        return f"only {len(present)} class present ({', '.join(present) or 'none'}); a classifier needs at least two{detail}"
    return None


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_task_data(
    uri: str,
    spec: TaskSpec,
    *,
    field_map: str | Mapping[str, str] | None = None,
    label_names: str | Sequence[str] | None = None,
    on_error: OnError = "fail",
    cache_dir: str | os.PathLike[str] | None = None,
    max_errors: int = DEFAULT_MAX_ERRORS,
    check_classes: bool = True,
    workers: int = 16,
    progress: bool = True,
) -> LoadedData:
    """Load and validate every record under ``uri`` for ``spec``.

    ``uri``: ``s3://bucket/prefix/``, a local folder or file, or ``file:///path``.
    ``field_map``: canonical name -> name in the files (dict or ``"problem=text,label=target"``).
    ``label_names``: class names for integer labels (sequence or ``"INTEGER,FRACTION,..."``).
    ``on_error``: ``"fail"`` raises one ``DataError`` listing the bad records (file:line: reason);
    ``"skip"`` drops them, counting them in ``n_skipped`` and keeping them in ``rejects``.
    ``check_classes``: refuse data with a missing class or a single class (in both modes);
    ``stats_report`` turns it off to report instead.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    fmap = resolve_field_map(spec, field_map)
    names = parse_label_names(label_names)

    uri = _normalise_uri(uri)
    files, ignored, listed = list_data_files(uri)
    if not files:
        if listed:
            shown = ", ".join(_rel_key(o) for o in listed[:10]) + (" ..." if len(listed) > 10 else "")
            what = f"listed {len(listed)} object(s) ({shown}), none a data file ({', '.join(DATA_SUFFIXES)})"
        elif not storage.is_s3(uri) and not storage.local_path(uri).exists():
            what = "the local path does not exist"
        else:
            what = "nothing is there"
        endpoint = " and the endpoint (AWS_ENDPOINT_URL_S3)" if storage.is_s3(uri) else ""
        raise DataError(
            f"no data files under {uri}: {what}. Check the prefix (task {spec.name} defaults to "
            f"{spec.data_prefix}){endpoint}, or write a small demo data set with `mycelium data demo`."
        )

    paths, n_down, n_bytes = fetch_files(files, cache_dir, workers=workers, progress=progress)
    normalise = _Normaliser(spec, fmap, names)
    records: list[Record] = []
    rejects: list[dict[str, Any]] = []
    read_files: list[ObjectInfo] = []
    n_skipped = 0  # records known to be dropped
    n_unreadable = 0  # files (or their ends) that could not be decoded

    for info, path in tqdm(
        list(zip(files, paths)), unit="file", desc="read", disable=None if progress and len(files) > 1 else True
    ):
        data = path.read_bytes()
        if not storage.is_s3(info.uri):
            # Local "etags" are size+mtime; the fingerprint must depend on content only.
            info = dataclasses.replace(info, etag=hashlib.md5(data, usedforsecurity=False).hexdigest())
        read_files.append(info)
        key = _rel_key(info)
        rows, damage = _read_rows(data, key)
        if damage is not None:
            # A file-level reject: its lost records are counted when the file says how many.
            lost = "an unknown number of records" if damage.records is None else f"{damage.records} record(s)"
            read = f"{len(rows)} record(s) before the damage were read, the rest is lost" if rows else f"{lost} lost"
            rejects.append({"file": info.uri, "line": 0, "kind": "unreadable_file", "reason": f"unreadable file: {damage.reason}; {read}",
                            "raw": None, "records": damage.records})
            n_unreadable += 1
            n_skipped += damage.records or 0
        for line, raw, obj in rows:
            try:
                if isinstance(obj, _RowError):
                    raise obj
                records.append(normalise(obj, key, info.uri, line))
            except _RowError as e:
                rejects.append({"file": info.uri, "line": line, "kind": e.kind, "reason": e.reason, "raw": raw, "value": e.value})
                n_skipped += 1

    if rejects and on_error == "fail":
        raise DataError(format_rejects(rejects, uri, spec, max_errors))
    if rejects:
        first = rejects[0]
        damaged = f" and the unreadable part of {n_unreadable} file(s)" if n_unreadable else ""
        log.warning("skipped %d bad record(s)%s under %s (on_error=skip); first: %s: %s", n_skipped, damaged, uri, _where(first),
                    first["reason"])
    if not records:
        raise DataError(
            f"no valid records under {uri} for task {spec.name}: every record was rejected.\n"
            + format_rejects(rejects, uri, spec, max_errors)
        )

    counter = Counter(r.label for r in records)
    labels = tuple(spec.labels) if spec.labels else tuple(sorted(counter))
    class_counts = {lab: counter.get(lab, 0) for lab in labels}
    if check_classes:
        problem = class_problem(spec, class_counts, names)
        if problem:
            raise DataError(
                f"cannot train task {spec.name} on {uri}: {problem}. Counts: "
                + ", ".join(f"{k}={v}" for k, v in class_counts.items())
                + ". Check the prefix and the label mapping (field_map / label_names); "
                "run `mycelium data stats` to see the distribution."
            )

    return LoadedData(
        uri=uri,
        records=records,
        labels=labels,
        fingerprint=fingerprint(read_files, fmap, names, spec.input_fields),
        files=read_files,
        n_skipped=n_skipped,
        n_unreadable_files=n_unreadable,
        rejects=rejects,
        class_counts=class_counts,
        field_map=fmap,
        label_names=names,
        ignored=[o.uri for o in ignored],
        n_downloaded=n_down,
        n_cached=sum(1 for f in files if storage.is_s3(f.uri)) - n_down,
        bytes_downloaded=n_bytes,
    )
