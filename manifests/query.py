"""DuckDB over a run's Parquet tables, local or in an object store: `sample` selects units, `export` writes a
slice as new shards.

One view, `units`, holds every unit of the run:
- accepted pairs from the shard manifests, with their flattened `score_<name>` columns;
- rejected and failed units from the ledger, with the same `score_<name>` columns parsed from the ledger's
  scores JSON, so one expression filters both (`--decision rejected --where "score_change_outside > 0.05"`).
Columns: unit_id, pair_id, sample_id, decision, stage, reason, message, shard, task, op, editor, source_uri,
instruction_en, instruction_zh, region_mask, scores (JSON), score_*. A score can also be named without its
prefix (`judge_sum < 8`) when no other column has that name.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.commit import atomic_write_bytes
from manifests.inspect import EXPORT_FILE, SCORE_PREFIX, Run, RunError, read_members
from manifests.schema import ACCEPTED, stable_hash
from manifests.shards import MANIFEST_SCHEMA, shard_name, write_shard
from manifests.storage import StorePath, store_path
from manifests.taxonomy import UnknownTaskError, task_by_name

BASE_COLUMNS = ("unit_id", "pair_id", "sample_id", "decision", "stage", "reason", "message", "shard", "task", "op",
                "editor", "source_uri", "instruction_en", "instruction_zh", "region_mask", "scores")
SAMPLE_ORDER = "md5(unit_id || CAST(? AS VARCHAR))"  # a seeded shuffle that does not depend on file order
CORPUS_ORDER = "shard, _row"  # the order of the source corpus
# DuckDB takes 80 % of RAM by default; capped, its sorts over millions of units spill to disk instead
DUCKDB_MEMORY = "512MB"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _file_names(con: duckdb.DuckDBPyConnection, root: StorePath) -> Callable[[StorePath], str]:
    """How DuckDB names the run's files: local paths as they are; in an object store `<protocol>://bucket/key`,
    read through the run's own pyarrow filesystem, registered with DuckDB as fsspec sees it. DuckDB's own S3
    reader (httpfs) is an extension it would download, configured apart; this way DuckDB still streams the files
    itself (a few columns, each file's row numbers, in its threads, under its memory cap) as it does local ones."""
    if root.is_local:
        return lambda path: path.path
    from fsspec.implementations.arrow import ArrowFSWrapper

    class Store(ArrowFSWrapper):
        """Each file's info fetched once: DuckDB asks for it (size, time) around every open, and on an object
        store each is a request (a manifest: 8 requests, 4 with this)."""
        cachable = False  # fsspec would hand every connection the same instance, with an old cache

        def __init__(self, fs):
            super().__init__(fs)
            self.infos: dict[str, dict] = {}

        def info(self, path, **kwargs):
            if (path := self._strip_protocol(path)) not in self.infos:
                self.infos[path] = super().info(path)
            return self.infos[path]

        def modified(self, path):
            return self.info(path)["mtime"]

    store = Store(root.fs)
    con.register_filesystem(store)
    return lambda path: f"{store.protocol}://{path.path}"


def connect(run: Run) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with the `units` view over the run; returns it and the score names.

    The manifests are read by their fixed columns, which every shard has, and the score columns are taken from
    each row's scores JSON (the pack flattens the same values into the manifests): manifests whose score
    columns differ would need DuckDB's union_by_name, which keeps a reader open per file (~60 kB each: a GB for
    a corpus of ten thousand shards)."""
    con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY})
    name = _file_names(con, run.root)
    parts, names, tables = [], set(), []
    if run.ledger_path:  # every unit's scores, the accepted pairs' included
        con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet({_literal(name(run.ledger_path))})")
        tables.append("ledger")
    if run.manifests():
        files = _literal(name(run.shards_dir / f"{run.prefix}-*.parquet"))
        fixed = ", ".join(quote_ident(c) for c in MANIFEST_SCHEMA.names)
        con.execute(f"CREATE VIEW manifests AS SELECT {fixed}, file_row_number FROM read_parquet({files}, "
                    "file_row_number = true)")
        tables = tables or ["manifests"]  # an export has no ledger: its scores are its manifests'
    for table in tables:
        names |= {r[0] for r in con.execute(f"SELECT DISTINCT unnest(json_keys(scores)) FROM {table} "
                                            "WHERE scores IS NOT NULL").fetchall()}
    scores = "".join(f", TRY_CAST(json_extract(scores, {_literal('$.' + quote_ident(n))}) AS DOUBLE) AS "
                     f"{quote_ident(SCORE_PREFIX + n)}" for n in sorted(names))
    if run.manifests():
        parts.append(f"SELECT pair_id AS unit_id, '{ACCEPTED}' AS decision, NULL::VARCHAR AS stage, "
                     "NULL::VARCHAR AS reason, NULL::VARCHAR AS message, file_row_number AS _row, pair_id, "
                     "sample_id, shard, task, op, editor, source_uri, instruction_en, instruction_zh, region_mask, "
                     f"scores{scores} FROM manifests")
    if run.ledger_path:
        parts.append("SELECT unit_id, pair_id, sample_id, status AS decision, stage, reason, message, "
                     "NULL::VARCHAR AS shard, task, op, editor, source_uri, instruction_en, NULL::VARCHAR AS "
                     f"instruction_zh, NULL::BOOLEAN AS region_mask, scores, NULL::BIGINT AS _row{scores} "
                     f"FROM ledger WHERE status <> '{ACCEPTED}'")
    if not parts:
        raise RunError(f"{run.root} has no manifests and no ledger: nothing to query")
    con.execute("CREATE VIEW units AS " + " UNION ALL BY NAME ".join(parts))
    return con, sorted(names)


def select_units(run: Run, *, tasks: list[str] | None = None, decision: str | None = None,
                 reason: str | None = None, where: str | None = None, n: int = 0, seed: int = 0,
                 order: str = SAMPLE_ORDER) -> tuple[list[dict], int, list[str]]:
    """(rows, number of matching units, score columns the expression names); n=0 means all."""
    for task in tasks or []:
        try:
            task_by_name(task)
        except UnknownTaskError as exc:
            raise RunError(str(exc)) from exc
    con, names = connect(run)
    # bare score names, unless a real column already has the name
    aliases = [n for n in names if n not in BASE_COLUMNS and not n.startswith(SCORE_PREFIX)]
    renames = "".join(f", {quote_ident(SCORE_PREFIX + a)} AS {quote_ident(a)}" for a in aliases)
    scoped = f"SELECT *{renames} FROM units"
    conditions, params = [], []
    for column, value in (("decision", decision), ("reason", reason)):
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    if tasks:
        conditions.append(f"task IN ({', '.join('?' for _ in tasks)})")
        params += tasks
    if where:
        conditions.append(f"({where})")
    exclude = f" EXCLUDE ({', '.join(quote_ident(a) for a in aliases)})" if aliases else ""
    sql = (f"WITH scoped AS ({scoped}) SELECT *{exclude}, count(*) OVER () AS _matches FROM scoped "
           f"WHERE {' AND '.join(conditions) or 'TRUE'} ORDER BY {order}" + (f" LIMIT {int(n)}" if n > 0 else ""))
    try:
        table = con.sql(sql, params=params + ([str(seed)] if order == SAMPLE_ORDER else [])).to_arrow_table()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        columns = ", ".join([*BASE_COLUMNS, *(SCORE_PREFIX + s for s in names)])
        raise RunError(f"bad --where expression {where!r}: {first}\navailable columns: {columns}" if where
                       else f"query over {run.root} failed: {first}") from exc
    matches = table["_matches"][0].as_py() if table.num_rows else 0
    mentioned = sorted({SCORE_PREFIX + m.removeprefix(SCORE_PREFIX) for m in re.findall(r"\w+", where or "")
                        if m.removeprefix(SCORE_PREFIX) in names})
    return table.drop_columns(["_matches", "_row"]).to_pylist(), matches, mentioned


def known_values(run: Run, column: str) -> list[str]:
    """Distinct non-null values of a units column (to suggest a valid --reason or --task)."""
    con, _ = connect(run)
    return [r[0] for r in con.execute(f"SELECT DISTINCT {quote_ident(column)} FROM units WHERE {quote_ident(column)} "
                                      "IS NOT NULL ORDER BY 1").fetchall()]


def export_slice(run: Run, out: str | Path | StorePath, *, tasks: list[str] | None = None,
                 where: str | None = None, shard_size: int = 100, prefix: str | None = None) -> dict:
    """Write the accepted pairs that match as new shards (+ manifests) under out/shards (a folder or an object
    store prefix); returns export.json."""
    out = store_path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--out {out} exists and is not an empty directory; export writes a fresh corpus")
    prefix = prefix or run.prefix
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise RunError(f"--prefix {prefix!r}: use letters, digits, '_' and '-' (keys and shard names are dot-free)")
    if shard_size < 1:
        raise RunError(f"--shard-size must be at least 1, got {shard_size}")
    rows, matches, _ = select_units(run, tasks=tasks, decision=ACCEPTED, where=where, order=CORPUS_ORDER)
    if not rows:
        raise RunError(f"no accepted pair of {run.root} matches the selection; nothing exported")
    writer = _ShardWriter(out / "shards", prefix, shard_size)
    by_shard: dict[str, list[str]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row["pair_id"])
    for shard, keys in by_shard.items():
        manifest = pq.read_table((run.shards_dir / f"{shard}.parquet").open())
        position = {key: i for i, key in enumerate(manifest["pair_id"].to_pylist())}
        members = read_members(run, shard, set(keys))
        for key in keys:
            row = manifest.slice(position[key], 1)
            files = []
            for name, digest in zip(row["members"][0].as_py(), row["member_sha256"][0].as_py()):
                data = members.get(key, {}).get(name)
                if data is None or hashlib.sha256(data).hexdigest() != digest:
                    raise RunError(f"{run.tar(shard)}: member {name} is missing or does not match its manifest "
                                   "checksum; run `x2edit-shards validate` before exporting")
                files.append((name, data))
            writer.add(key, files, row)
    writer.flush()
    # written last: an interrupted export leaves a folder that open_run refuses, not a partial corpus
    body = {"prefix": prefix, "source_run": str(run.root), "selection": {"tasks": tasks, "where": where},
            "pairs": matches, "shards": writer.summaries}
    atomic_write_bytes(out / EXPORT_FILE, json.dumps(body, indent=2, ensure_ascii=False).encode())
    return body


class _ShardWriter:
    """Collects pairs and writes a shard (tar, then its committing manifest) every `size` pairs."""

    def __init__(self, out_dir: StorePath, prefix: str, size: int):
        self.out_dir, self.prefix, self.size = out_dir, prefix, size
        self.pending: list[tuple[str, list[tuple[str, bytes]], pa.Table]] = []
        self.summaries: list[dict] = []

    def add(self, key: str, files: list[tuple[str, bytes]], row: pa.Table) -> None:
        self.pending.append((key, files, row))
        if len(self.pending) == self.size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = shard_name(self.prefix, len(self.summaries))
        table = pa.concat_tables([r for _, _, r in self.pending], promote_options="default")
        table = table.set_column(table.schema.get_field_index("shard"), "shard", pa.array([name] * table.num_rows))
        # the pack stage writes the score columns of the scores a shard holds; an all-null column is not one
        scores = sorted(c for c in table.column_names if c.startswith(SCORE_PREFIX) and table[c].null_count
                        < table.num_rows)
        table = table.select([*MANIFEST_SCHEMA.names, *scores]).replace_schema_metadata(None)
        keys = [k for k, _, _ in self.pending]
        members = [f for _, files, _ in self.pending for f in files]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.summaries.append(write_shard(self.out_dir, name, members, table, {"plan_hash": stable_hash(*keys)}))
        self.pending = []

