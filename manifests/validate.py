"""`x2edit-shards validate`: is a run dir an intact corpus?

Checks, each failure worded with the file, key and values involved:
- every committed tar opens and reads to the end; its size and sha256 match the manifest's summary;
- tar members and manifest rows agree one to one, member by member checksum, and each `<key>.json` agrees
  with its manifest row on pair id, task and instructions;
- keys are unique across the whole corpus; no uncommitted tars or temporary files are left;
- the ledger (when the run has one) accepts exactly the corpus's pairs into the shards that hold them, every
  unit has one terminal state, every ended unit has a stage and a reason, and report.json's counts agree;
- the ledger holds every planned unit and sample: its ids agree with each stage's completion record.

Scale: shards are checked one at a time (a process per core once there are many), each tar read once for
its checksum and its members; the corpus-wide checks hold ids as Arrow columns, not Python objects.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.fragments import COMPLETE_NAME, first_occurrences, plan_record, read_completion, read_units
from manifests.inspect import Run, list_shards, temp_files
from manifests.ledger import ledger_plan, read_ledger
from manifests.schema import ACCEPTED, STAGES, TERMINAL
from manifests.shards import summary_of
from manifests.storage import StorePath

PARALLEL_FROM = 64  # shards; fewer are checked in this process (starting workers would cost more)
MANIFEST_COLUMNS = ["pair_id", "shard", "task", "instruction_en", "instruction_zh", "members", "member_sha256"]


def validate(run: Run, workers: int = 1) -> tuple[list[str], dict]:
    """(problems, counts); no problems means the corpus is intact. `workers` > 1 checks the shards in that
    many spawned processes (a main module then has to be import-safe, as the CLI's is)."""
    problems = [f"{run.tar(r['shard'])}: tar without manifest (uncommitted; a pipeline rerun discards it)"
                for r in list_shards(run) if r["state"].startswith("uncommitted")]
    problems += [f"{p}: temporary file left by an interrupted writer" for p in temp_files(run)]
    paths = run.manifests()
    check = partial(_check_shard, run)
    if workers < 2 or len(paths) < PARALLEL_FROM:
        results = list(map(check, paths))
    else:  # spawned, not forked: this process's Arrow thread pools must not be copied mid-flight
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(check, paths, chunksize=16))
    totals, keys = Counter(), [pa.array([], pa.string())]
    for found, counts, pairs in results:
        problems += found
        totals.update(counts)
        keys.append(pairs)
    shard = pc.take(pa.array([p.stem for p in paths], pa.string()),
                    pa.array(np.repeat(np.arange(len(paths)), [len(k) for k in keys[1:]])))
    corpus = pa.table({"pair_id": pa.concat_arrays(keys), "shard": shard})
    owner = _owners(corpus, problems)
    counts = {"shards": len(paths), **totals}
    if run.ledger_path:
        counts["ledger"] = _check_ledger(run, owner, totals, problems)
    return problems, counts


def _owners(corpus: pa.Table, problems: list[str]) -> pa.Table:
    """(pair_id, shard) with the first shard of each key; a key in more than one shard is a problem."""
    first = first_occurrences(corpus["pair_id"])
    if first is None:
        return corpus
    owner = corpus.take(first)
    seen = {}
    repeated = pc.is_in(corpus["pair_id"], pc.filter(corpus["pair_id"], pc.invert(_mask(len(corpus), first))))
    for key, shard in zip(*(corpus.filter(repeated)[c].to_pylist() for c in ("pair_id", "shard"))):
        if key in seen:
            problems.append(f"duplicate key {key}: in {seen[key]} and {shard}")
        seen.setdefault(key, shard)
    return owner


def _mask(n: int, indices: pa.Array) -> pa.Array:
    mask = np.zeros(n, bool)
    mask[indices.to_numpy()] = True
    return pa.array(mask)


def _check_ledger(run: Run, owner: pa.Table, totals: Counter, problems: list[str]) -> dict:
    labels = ["status", "stage", "reason"]  # a few values each: dictionary-encoded, 4 B a row
    where = run.ledger_path
    table = read_ledger(run.root, ["unit_id", "sample_id", *labels, "shard"], labels)
    problems += _check_plan(run, table)
    if (first := first_occurrences(table["unit_id"])) is not None:
        repeated = pc.unique(pc.filter(table["unit_id"], pc.invert(_mask(len(table), first))))
        problems.append(f"{where}: {len(repeated)} units have more than one row (first: "
                        f"{pc.filter(table['unit_id'], pc.is_in(table['unit_id'], repeated))[0]})")
    status = table["status"]
    terminal = pc.fill_null(pc.is_in(status, pa.array(TERMINAL)), False)
    for unit, value in _rows(table.filter(pc.invert(terminal)), "unit_id", "status"):
        problems.append(f"{where}: unit {unit} has status {value!r}, not one of {TERMINAL}")
    accepted = pc.and_(terminal, pc.equal(status, ACCEPTED))
    unreasoned = pc.or_(*(pc.fill_null(pc.equal(table[c], ""), True) for c in ("stage", "reason")))
    for unit, value in _rows(table.filter(pc.and_(pc.and_(terminal, pc.invert(accepted)), unreasoned)),
                             "unit_id", "status"):
        problems.append(f"{where}: {value} unit {unit} has no stage or reason")
    kept = table.filter(accepted).select(["unit_id", "shard"])
    kept = kept.append_column("_i", pa.array(np.arange(len(kept))))
    placed = kept.join(owner, keys="unit_id", right_keys="pair_id", join_type="inner",
                       right_suffix="_corpus").sort_by("_i")
    wrong = pc.fill_null(pc.not_equal(placed["shard"], placed["shard_corpus"]), True)
    for unit, shard, held in _rows(placed.filter(wrong), "unit_id", "shard", "shard_corpus"):
        problems.append(f"{where}: accepts {unit} into {shard}, the corpus has it in {held}")
    ids = kept["unit_id"]
    for label, mine, other in (("accepted by the ledger but in no manifest", ids, owner["pair_id"]),
                               ("in a manifest but not accepted by the ledger", owner["pair_id"], ids)):
        lacking = pc.unique(pc.filter(mine, pc.invert(pc.is_in(mine, other))))
        if len(lacking):
            problems.append(f"{len(lacking)} pairs {label} (first: {pc.min(lacking).as_py()})")
    groups = table.group_by("status", use_threads=False).aggregate([("unit_id", "count", pc.CountOptions("all"))])
    counts = dict(zip(groups["status"].to_pylist(), groups["unit_id_count"].to_pylist()))
    if (report := run.report_json()) is not None:
        claims = {"units": (report["units"], counts), "accepted": (report["accepted"], counts.get(ACCEPTED, 0)),
                  "shards.count": (report["shards"]["count"], len(run.manifests())),
                  "shards.pairs": (report["shards"]["pairs"], totals["pairs"]),
                  "shards.bytes": (report["shards"]["bytes"], totals["bytes"])}
        problems += [f"{run.root / 'report.json'}: {name} is {said}, the run has {actual}"
                     for name, (said, actual) in claims.items() if said != actual]
    return counts


def _rows(table: pa.Table, *columns: str):
    return zip(*(table[c].to_pylist() for c in columns))


def _check_plan(run: Run, ledger: pa.Table) -> list[str]:
    """The ledger against the stages' completion records (or, for a corpus copied without its stage outputs,
    the copy of them the ledger was written with): one row for every planned unit and sample."""
    stages_dir = run.root / "stages"
    records = {s: r for s in STAGES[:-1] if (r := read_completion(stages_dir / s))}
    origin = {s: stages_dir / s / COMPLETE_NAME for s in records}
    if not records:
        records = ledger_plan(run.ledger_path)
        origin = {s: f"the plan recorded in {run.ledger_path.name}" for s in records}
    if "score" not in records:
        return [f"{run.ledger_path}: no completion record of stage 'score', so the ledger cannot be checked against "
                "the plan (rerun the pipeline on this run dir: it records completion without recomputing)"]
    have = plan_record(ledger)
    problems = []
    for stage, record in records.items():
        for kind, column in (("samples", "sample_id"), ("units", "unit_id")):
            if kind == "units" and stage == "source" or record[f"{kind}_sha"] == have[f"{kind}_sha"]:
                continue  # source units are samples, fanned out into pairs later
            fragments = read_units(stages_dir / stage, columns=sorted({"unit_id", column}))
            planned = fragments[column] if column in fragments.column_names else pa.array([], pa.string())
            missing = pc.unique(pc.filter(planned, pc.invert(pc.is_in(planned, ledger[column]))))
            first = f"; missing: {len(missing)} (first: {pc.min(missing).as_py()})" if len(missing) else ""
            problems.append(f"{run.ledger_path}: has {have[kind]} {kind}, stage {stage!r} completed "
                            f"{record[kind]} ({origin[stage]}){first}")
    return problems


# ------------------------------------------------------------------------------------------ one shard

def _check_shard(run: Run, path: StorePath) -> tuple[list[str], dict, pa.Array]:
    """(problems, counts, the shard's pair ids): its manifest, and its tar against it."""
    shard, problems = path.stem, []
    try:
        file = pq.ParquetFile(path.open())
        summary = summary_of(file.schema_arrow)
        rows = file.read(columns=MANIFEST_COLUMNS).to_pylist()
    except (KeyError, ValueError, OSError, pa.ArrowException) as exc:
        return ([f"{path}: unreadable manifest or missing x2edit summary ({type(exc).__name__}: {exc})"], {},
                pa.array([], pa.string()))
    if summary.get("shard") != shard or summary.get("pairs") != len(rows):
        problems.append(f"{path}: its summary says shard {summary.get('shard')!r} with {summary.get('pairs')} "
                        f"pairs, the file is {shard} with {len(rows)} rows")
    for r in rows:
        if r["shard"] != shard:
            problems.append(f"{path}: pair {r['pair_id']} has shard={r['shard']!r}")
        strays = [m for m in r["members"] if m.partition(".")[0] != r["pair_id"]]
        if strays or len(r["members"]) != len(r["member_sha256"]):
            problems.append(f"{path}: pair {r['pair_id']} lists members {r['members']} with "
                            f"{len(r['member_sha256'])} checksums")
    keys = pa.array([r["pair_id"] for r in rows], pa.string())
    tar_path = run.tar(shard)
    try:
        members, digest, size = _check_tar(run, shard, rows, problems)
    except FileNotFoundError:
        problems.append(f"{path}: committed manifest without its tar {tar_path.name}")
        return problems, {"pairs": len(rows)}, keys
    if size != summary.get("bytes") or digest != summary.get("sha256"):
        problems.append(f"{tar_path}: {size} bytes, sha256 {digest[:16]}…; its manifest recorded "
                        f"{summary.get('bytes')} bytes, sha256 {str(summary.get('sha256'))[:16]}…")
    return problems, {"pairs": len(rows), "members": members, "bytes": size}, keys


class _Hashing:
    """A file read front to back, hashed on the way: the tar's checksum in the same pass as its members."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def finish(self) -> tuple[str, int]:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest(), self.size


class _NotPlain(Exception):
    """Anything but a plain file in an intact ustar header (pax, GNU names, links, a bad checksum, a cut
    archive): tarfile reads the tar instead, and words what is wrong with it."""


def _plain_members(f: _Hashing):
    """(name, data) of a tar of plain ustar files, the only kind the pipeline writes, at a fraction of
    tarfile's cost per member."""
    while True:
        header = f.read(512)
        if not header or header == bytes(512):
            return
        try:
            stored = int(header[148:156].split(b"\0", 1)[0] or b"0", 8)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlain from None
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if (len(header) < 512 or stored != sum(header) - sum(header[148:156]) + 256 or name.endswith("/")
                or header[156:157] not in (b"0", b"\0") or header[345] and header[257:265] != b"ustar\x0000"):
            raise _NotPlain
        if header[345]:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        data = f.read(size)
        if len(data) < size or len(f.read(-size % 512)) < -size % 512:
            raise _NotPlain
        yield name, data


def _tarfile_members(path: StorePath):
    with path.open_walk() as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            yield info.name, tar.extractfile(info).read() if info.isfile() else b""


def _check_tar(run: Run, shard: str, rows: list[dict], problems: list[str]) -> tuple[int, str, int]:
    """Members of one tar against its manifest rows; returns (members read, the tar's sha256, its size)."""
    tar_path = run.tar(shard)
    with tar_path.open_walk() as f:
        reader = _Hashing(f)
        found: list[str] = []
        try:
            seen = _check_members(tar_path, shard, rows, _plain_members(reader), problems, found)
        except _NotPlain:
            found, seen = [], None
        digest, size = reader.finish()
    if seen is None:  # not the pipeline's layout: tarfile reads it, from the start
        seen = _check_members(tar_path, shard, rows, _tarfile_members(tar_path), problems, found)
    return seen, digest, size


def _check_members(tar_path: StorePath, shard: str, rows: list[dict], members, problems: list[str],
                   found: list[str]) -> int:
    """Problems of the members against the manifest rows (appended to `found`, then `problems` once the
    walk is over, so a walk abandoned for tarfile's leaves none behind); returns how many were read."""
    expected = {name: digest for r in rows for name, digest in zip(r["members"], r["member_sha256"])}
    by_key = {r["pair_id"]: r for r in rows}
    seen: set[str] = set()
    try:
        for name, data in members:
            key = name.partition(".")[0]
            if name in seen:
                found.append(f"{tar_path}: member {name} appears twice")
            elif name not in expected:
                found.append(f"{tar_path}: member {name} is not listed in {shard}.parquet")
            elif (digest := hashlib.sha256(data).hexdigest()) != expected[name]:
                found.append(f"{tar_path}: member {name} has sha256 {digest[:16]}…, {shard}.parquet says "
                             f"{expected[name][:16]}…")
            elif name == f"{key}.json" and key in by_key:
                found += _json_disagreements(tar_path, name, data, by_key[key])
            seen.add(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        found.append(f"{tar_path}: truncated or corrupt tar after {len(seen)} members ({type(exc).__name__}: {exc})")
        problems += found
        return len(seen)
    found += [f"{tar_path}: member {n} listed in {shard}.parquet is missing" for n in sorted(set(expected) - seen)]
    problems += found
    return len(seen)


def _json_disagreements(tar_path: StorePath, name: str, data: bytes, row: dict) -> list[str]:
    try:
        record = json.loads(data)
    except ValueError as exc:
        return [f"{tar_path}: member {name} is not JSON ({exc})"]
    return [f"{tar_path}: {name} has {field}={record.get(field)!r}, the manifest says {row[field]!r}"
            for field in ("pair_id", "task", "instruction_en", "instruction_zh") if record.get(field) != row[field]]
