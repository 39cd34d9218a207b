"""The video-QA dataset schema, its validation, and importers for users' own data.

One row per question. ``video_path`` is relative to the table's folder (or absolute), so a
dataset directory can be moved or shipped to a cluster with ``--working-dir``. ``evidence`` and
``distractors`` exist for analysis (recall, contact sheets) and are never shown to the policy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SPAN = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())])

SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("video_id", pa.string()),
        ("video_path", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("answer", pa.int32()),
        ("duration_s", pa.float64()),
        ("split", pa.string()),
        ("family", pa.string()),
        ("evidence", pa.list_(SPAN)),
        ("distractors", pa.list_(SPAN)),
    ]
)
REQUIRED = ("question_id", "video_id", "video_path", "question", "options", "answer", "split")
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "duration_s": None,
    "family": "",
    "evidence": [],
    "distractors": [],
}


class DatasetError(ValueError):
    """A dataset row or field is invalid; the message names the row and the field."""


def validate_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Check one row and return it normalised to SCHEMA; raise DatasetError naming `where`."""
    for key in REQUIRED:
        if row.get(key) in (None, ""):
            raise DatasetError(f"{where}: missing required field '{key}'")
    out = {k: row.get(k, v) for k, v in OPTIONAL_DEFAULTS.items()}
    out.update({k: row[k] for k in REQUIRED})
    options = out["options"]
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError:
            options = [o.strip() for o in options.split("|")]
    if not isinstance(options, list) or len(options) < 2:
        raise DatasetError(f"{where}: field 'options' needs at least two options, got {options!r}")
    if any(not isinstance(o, str) or not o.strip() for o in options):
        raise DatasetError(f"{where}: field 'options' has an empty or non-text option")
    if len(set(options)) != len(options):
        raise DatasetError(f"{where}: field 'options' repeats an option: {options!r}")
    out["options"] = [str(o) for o in options]
    try:
        answer = int(out["answer"])
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: field 'answer' must be an option index, got {out['answer']!r}")
    if not 0 <= answer < len(options):
        raise DatasetError(
            f"{where}: field 'answer' = {answer} is out of range for {len(options)} options"
        )
    out["answer"] = answer
    if out["split"] not in ("train", "val", "test"):
        raise DatasetError(f"{where}: field 'split' must be train, val or test, got {out['split']!r}")
    for key in ("question_id", "video_id", "video_path", "question", "family"):
        out[key] = str(out[key])
    for key in ("evidence", "distractors"):
        spans = out[key] or []
        if isinstance(spans, str):
            spans = json.loads(spans)
        norm = []
        for span in spans:
            s, e = (span["start_s"], span["end_s"]) if isinstance(span, dict) else span
            if not 0 <= float(s) <= float(e):
                raise DatasetError(f"{where}: field '{key}' has a bad span {span!r}")
            norm.append({"start_s": float(s), "end_s": float(e)})
        out[key] = norm
    if out["duration_s"] is not None:
        out["duration_s"] = float(out["duration_s"])
    return out


def validate_rows(rows: list[dict[str, Any]], source: str) -> pa.Table:
    """Validate rows (1-based row numbers in errors) and build a table; question ids are unique."""
    seen: dict[str, int] = {}
    clean = []
    for i, row in enumerate(rows, start=1):
        r = validate_row(row, f"{source} row {i}")
        if r["question_id"] in seen:
            raise DatasetError(
                f"{source} row {i}: field 'question_id' {r['question_id']!r} repeats row "
                f"{seen[r['question_id']]}"
            )
        seen[r["question_id"]] = i
        clean.append(r)
    return pa.Table.from_pylist(clean, schema=SCHEMA)


def read_table(path: str | Path) -> pa.Table:
    """Read and validate a dataset table (Parquet, JSONL or CSV)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        missing = [k for k in REQUIRED if k not in table.column_names]
        if missing:
            raise DatasetError(f"{path}: missing required column(s) {missing}")
        return validate_rows(table.to_pylist(), str(path))
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path} row {i}: not valid JSON ({e.msg})") from None
        return validate_rows(rows, str(path))
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return validate_rows(list(csv.DictReader(f)), str(path))
    raise DatasetError(f"{path}: unknown dataset format {path.suffix!r} (parquet, jsonl or csv)")


def resolve_video(table_path: str | Path, video_path: str) -> Path:
    """A row's video path: relative paths are relative to the table's folder."""
    p = Path(video_path)
    return p if p.is_absolute() else Path(table_path).resolve().parent / p


def import_table(src: str | Path, out: str | Path) -> pa.Table:
    """Validate users' JSONL/CSV data, check every video exists, and write it as Parquet."""
    table = read_table(src)
    missing = [
        f"{src} row {i}: field 'video_path' {p!r} does not exist"
        for i, p in enumerate(table.column("video_path").to_pylist(), start=1)
        if not resolve_video(src, p).exists()
    ]
    if missing:
        raise DatasetError("\n".join(missing[:20]))
    # paths become absolute so the Parquet file may live anywhere
    abs_paths = [str(resolve_video(src, p)) for p in table.column("video_path").to_pylist()]
    table = table.set_column(SCHEMA.get_field_index("video_path"), "video_path", pa.array(abs_paths))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return table
