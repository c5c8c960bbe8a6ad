"""``mycelium predict``: labels and class probabilities for a JSONL file or stdin.

::

    mycelium predict --task c6 --input problems.jsonl --output predictions.jsonl
    echo "What is 1/2 + 1/3?" | mycelium predict --task c6 --input -
    mycelium predict --task c4 --model 7 --input pairs.jsonl          # version 7 of mycelium-c4

Input, one record per line (blank lines are skipped):

* a JSON object with the task's input fields (C4/C5: ``step_i``, ``step_j``; C6: ``problem``);
  other keys are ignored except ``id``, which is copied to the output;
* a JSON array with the input fields in order;
* for one-field tasks (C6), any other line is the text itself (a JSON string is decoded), so
  plain problem text can be piped in.

Output, one JSON object per input record, in input order:
``{"id": ..., "label": "FRACTION", "probabilities": {"DECIMAL": 0.01, ...}}`` (``id`` only
when the input had one). Every record is read and checked before the model runs, so a bad line
fails fast with its line number; nothing is written then. ``--output`` is written to a temporary
file renamed into place at the end.

``--model``: ``champion`` (default) or another alias, a version number, or a model URI
(``models:/...``, ``runs:/<run_id>/<model name>``, a local model folder). The model runs on the
GPU when there is one (``--device`` overrides), in batches of ``--batch-size``; a progress bar
goes to stderr for inputs of ``PROGRESS_MIN_ROWS`` records or more.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from mycelium.tasks import CHAMPION

PROGRESS_MIN_ROWS = 1000
MAX_REPORTED_ERRORS = 5


class InputError(ValueError):
    """A bad input line; the message names the input and the line."""


def parse_model_arg(value: str | None) -> dict[str, str | None]:
    """``--model`` as keyword arguments of ``mycelium.load``: alias, version or model_uri."""
    value = (value or CHAMPION).strip()
    if ":/" in value or value.startswith((".", "/", "~")) or os.sep in value or os.path.isdir(value):
        return {"model_uri": value, "version": None, "alias": None}
    digits = value[1:] if value[:1] in "vV" else value
    if digits.isdigit():
        return {"version": digits, "model_uri": None, "alias": None}
    return {"alias": value, "version": None, "model_uri": None}


def _open_input(name: str) -> TextIO:
    if name == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict") if hasattr(sys.stdin, "buffer") else sys.stdin
    path = Path(name).expanduser()
    if not path.is_file():
        raise InputError(f"--input {name}: no such file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_line(line: str, fields: list[str]) -> dict[str, Any]:
    """One input line as a record dict; raises ``ValueError`` saying what is wrong."""
    text = line.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        return obj
    if text.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, list):
            if len(obj) != len(fields):
                raise ValueError(f"the array has {len(obj)} values, expected {len(fields)} ({', '.join(fields)})")
            return dict(zip(fields, obj))
    if len(fields) == 1:
        if text.startswith('"'):
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, str):
                return {fields[0]: decoded}
        return {fields[0]: text}
    raise ValueError(
        f"expected a JSON object with the fields {', '.join(fields)} (or a JSON array of them in this order)"
    )


def read_records(stream: Iterable[str], fields: list[str], source: str = "input") -> tuple[list[dict], list[int]]:
    """Records and their 1-based line numbers; ``InputError`` listing up to 5 bad lines."""
    records: list[dict] = []
    lines: list[int] = []
    errors: list[str] = []
    n_bad = 0
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_line(line, fields))
            lines.append(number)
        except ValueError as e:
            n_bad += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"{source} line {number}: {e}")
    if errors:
        more = f" (and {n_bad - len(errors)} more)" if n_bad > len(errors) else ""
        raise InputError("bad input lines" + more + ":\n  " + "\n  ".join(errors))
    return records, lines


def check_records(model, records: list[dict], lines: list[int], source: str = "input") -> list[tuple[str, ...]]:
    """The serving rules over all records at once; on failure, the bad records by line number."""
    from mycelium.api import InvalidInputError

    try:
        return model.rows(records)
    except InvalidInputError:
        pass
    errors: list[str] = []
    for rec, number in zip(records, lines):
        try:
            model.rows([rec])
        except InvalidInputError as e:
            reason = str(e).replace("invalid input: ", "").replace("row 0, ", "")
            reason = reason.split(" (only ", 1)[0] if "(only " in reason else reason
            errors.append(f"{source} line {number}: {reason}")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    allow = model.manifest.get("allow_empty") or []
    hint = f" ({', '.join(allow)} may be empty)" if allow else ""
    raise InputError(
        f"bad input records for {model.task} (fields: {', '.join(model.input_fields)}){hint}:\n  " + "\n  ".join(errors)
    )


def output_record(record: dict, prediction) -> dict:
    out = {"id": record["id"]} if "id" in record else {}
    out.update(prediction.to_dict())
    return out


def run_predict(args) -> int:
    """The ``mycelium predict`` command; returns the exit status."""
    from tqdm.auto import tqdm

    from mycelium import api
    from mycelium.serving.checkpoint import CheckpointError
    from mycelium.tasks import get_task

    source = "stdin" if args.input == "-" else args.input
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
        # Read everything first: a bad line fails before the model is downloaded and loaded.
        fields = list(get_task(args.task).input_fields)
        with _open_input(args.input) as stream:
            text = list(stream)
        records, lines = read_records(text, fields, source)
        model = api.load(args.task, device=args.device, registered_model=args.registered_model,
                         backbone=args.backbone, batch_size=args.batch_size, **parse_model_arg(args.model))
        if model.input_fields != fields:  # trained with -P inputs=...: plain-text and array lines map onto its fields
            records, lines = read_records(text, model.input_fields, source)
        if not args.quiet:
            where = f"{model.registered_model} v{model.version}" if model.version else model.model_uri
            print(f"{model.task}: {where} on {model.device} (labels: {', '.join(model.labels)})", file=sys.stderr)
        rows = check_records(model, records, lines, source)
        write_predictions(model, records, rows, args.output, args.batch_size,
                          progress=not args.quiet and len(rows) >= PROGRESS_MIN_ROWS, tqdm=tqdm)
    except (InputError, api.InvalidInputError, api.ModelNotFoundError, api.ModelLoadError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mycelium predict ... | head`
        sys.stderr.close()
        return 0
    return 0


def write_predictions(model, records: list[dict], rows: list[tuple[str, ...]], output: str | None,
                      batch_size: int, progress: bool, tqdm) -> None:
    from mycelium.api import to_predictions
    from mycelium.serving.checkpoint import predict_proba

    tmp = None
    if output and output != "-":
        final = Path(output).expanduser()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        out = open(tmp, "w", encoding="utf-8")
    else:
        out = sys.stdout
    # Chunks of many batches: predict_proba sorts each chunk by length, so batches pad little.
    chunk = batch_size * 32
    try:
        with tqdm(total=len(rows), unit="rec", desc=f"{model.task} predict", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, len(rows), chunk):
                probs = predict_proba(model.model, model.tokenizer, model.manifest, rows[start : start + chunk],
                                      batch_size=batch_size)
                for rec, pred in zip(records[start : start + chunk], to_predictions(probs, model.labels, model.manifest.get("threshold"))):
                    out.write(json.dumps(output_record(rec, pred), ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(probs))
        if tmp is not None:
            out.close()
            os.replace(tmp, final)
            tmp = None
    finally:
        if tmp is not None:
            out.close()
            tmp.unlink(missing_ok=True)
