"""`x2edit-shards validate` at scale, without Ray: shards checked in worker processes agree with the checks in
one process, the tars the pipeline writes take the fast ustar walk, and any other tar (pax headers, a damaged
header) is read by tarfile with the same verdicts."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from io import BytesIO

import pyarrow.parquet as pq
import pytest

from bench.scale import synthesise
from manifests import validate as validation
from manifests.fragments import read_units
from manifests.inspect import EXPORT_FILE, open_run
from manifests.shards import iter_shard, shard_summary
from manifests.validate import validate
from pipeline.stage_state import stage_dir
from stages.base import StageContext
from stages.pack import PLAN_COLUMNS, PackConfig, PackStage, plan_shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shards of ~200 pairs (an export-like corpus: shards and manifests, no ledger)."""
    root = tmp_path_factory.mktemp("corpus")
    synthesise(root / "run", 300, fragment_rows=64)
    rows_dir = stage_dir(root / "run", "score")
    cfg = PackConfig(prefix="v", shard_size=20)
    stage = PackStage(cfg, StageContext(seed=0, recipe_hash="test", run_dir=str(root)), str(rows_dir),
                      str(root / "shards"))
    (root / "shards").mkdir()
    for job in plan_shards(read_units(rows_dir, columns=list(PLAN_COLUMNS)), cfg).jobs(skip=set()).to_pylist():
        stage.write_job(job)
    (root / EXPORT_FILE).write_text(json.dumps({"prefix": "v"}))
    return root


def test_worker_processes_find_what_one_process_finds(corpus, monkeypatch):
    with monkeypatch.context() as patch:  # the pipeline's tars take the fast walk
        patch.setattr(validation, "_tarfile_members", lambda path: pytest.fail(f"tarfile read {path}"))
        inline = validate(open_run(corpus))
    monkeypatch.setattr(validation, "PARALLEL_FROM", 1)
    assert validate(open_run(corpus), workers=2) == inline and not inline[0] and inline[1]["pairs"] > 150


def _rewrite(corpus, shard: str, data: bytes) -> None:
    """Replace a shard's tar, its manifest's summary following (as a writer of such tars would)."""
    path = corpus / "shards" / f"{shard}.parquet"
    manifest = pq.read_table(path)
    summary = {**shard_summary(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (corpus / "shards" / f"{shard}.tar").write_bytes(data)
    pq.write_table(manifest.replace_schema_metadata({b"x2edit": json.dumps(summary)}), path)


def test_tars_that_are_not_plain_ustar_are_read_by_tarfile(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    buf = BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in iter_shard(copy / "shards" / "v-000000.tar"):
            for field, data in sample.items():
                if field != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                    info.size, info.pax_headers = len(data), {"comment": "a pax header"}
                    tar.addfile(info, BytesIO(data))
    _rewrite(copy, "v-000000", buf.getvalue())
    problems, counts = validate(open_run(copy))
    assert problems == [] and counts == validate(open_run(corpus))[1] | {"bytes": counts["bytes"]}

    damaged = bytearray(buf.getvalue())
    damaged[1024 + 150] ^= 0x01  # a header's checksum field: tarfile calls the archive corrupt
    _rewrite(copy, "v-000000", bytes(damaged))
    problems, _ = validate(open_run(copy))
    assert len(problems) == 1 and "v-000000.tar: truncated or corrupt tar after" in problems[0]
