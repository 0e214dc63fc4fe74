"""The pair schema: the row every stage passes on, and how pair ids and statuses are spelled.

A row is one unit of work. Before the instruct stage a unit is a source sample (unit_id = sample_id);
the instruct stage fans a sample out into candidate pairs (unit_id = pair_id), one per task. Rows that a
stage ends (rejected / failed) keep travelling, without their images (except the score policy's rejections,
kept for `refilter`), so the last stage sees every unit exactly once and the ledger is built from one place.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

LIVE, ACCEPTED, REJECTED, FAILED = "live", "accepted", "rejected", "failed"
TERMINAL = (ACCEPTED, REJECTED, FAILED)

# Stage order of the pipeline, the one list of it; a row's `stage` column names the stage that ended it.
STAGES = ("source", "instruct", "edit", "score", "pack")
ROW_STAGES = STAGES[:-1]  # the stages that process rows (and time them); pack writes the rows into shards

ROW_SCHEMA = pa.schema([
    # identity and fan-out bookkeeping (see manifests.fragments for how resume uses them)
    ("unit_id", pa.string()),
    ("sample_id", pa.string()),
    ("fanout", pa.int32()),  # rows this sample became at the instruct stage (1 before it)
    ("status", pa.string()),  # live | accepted | rejected | failed
    ("stage", pa.string()),  # stage that ended the row
    ("reason", pa.string()),  # reason code (rejected) or error class (failed)
    ("message", pa.string()),
    ("warnings", pa.list_(pa.string())),
    # source
    ("source_uri", pa.string()),
    ("position", pa.int64()),  # deterministic position of the sample in the input plan
    ("source_meta", pa.string()),  # JSON: sidecar + caption
    ("src", pa.binary()),  # encoded image (JPEG); the pair's source after the edit stage
    ("width", pa.int32()),
    ("height", pa.int32()),
    # instruct
    ("pair_id", pa.string()),
    ("task", pa.string()),
    ("task_id", pa.int32()),
    ("op", pa.string()),
    ("params", pa.string()),  # JSON
    ("instruction_en", pa.string()),
    ("instruction_zh", pa.string()),
    ("seed", pa.int64()),
    ("subject", pa.string()),  # JSON description of the subject the instruction names
    # edit
    ("edited", pa.binary()),  # encoded image (JPEG)
    ("mask", pa.binary()),  # encoded PNG, optional
    ("editor", pa.string()),
    ("provenance", pa.string()),  # JSON: workers + versions per stage, seeds, recipe hash
    # score
    ("scores", pa.string()),  # JSON {name: float}, every score computed
    ("thresholds", pa.string()),  # JSON of the policy rules applied
    ("thumb", pa.binary()),  # small JPEG of src | edited, kept when a row ends after its images exist
    # seconds each stage spent on this row (batch time / batch rows)
    *[(f"t_{stage}", pa.float64()) for stage in ROW_STAGES],
])
COLUMNS = tuple(ROW_SCHEMA.names)
HEAVY_COLUMNS = ("src", "edited", "mask")  # dropped when a row ends (kept by the score policy's rejections)


def empty_row() -> dict:
    return dict.fromkeys(COLUMNS)


def stable_hash(*parts: object, n: int = 16) -> str:
    """Hex digest of the parts; stable across processes and machines (unlike hash())."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def stable_seed(*parts: object) -> int:
    return int(stable_hash(*parts, n=15), 16)


def make_pair_id(sample_id: str, task: str, seed: int, editor: str) -> str:
    """Deterministic, dot-free WebDataset key: task name plus a hash of what makes the pair."""
    return f"{task}-{stable_hash(sample_id, task, seed, editor, n=20)}"
