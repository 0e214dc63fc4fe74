"""Every reader of a corpus, on a run dir in an S3-compatible store (moto's server on 127.0.0.1): `x2edit-shards`
gives the same answers as on the local run dir, the trainer's index reads the same pairs, and the stock readers
(Ray Data, webdataset, Hugging Face `datasets`) read the shards the way the README shows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from manifests.cli import main
from manifests.storage import store_path
from tests.s3_server import new_bucket
from trainer.data import PairDataset, index_shards


@pytest.fixture(scope="module")
def s3_run(s3_server, default_run) -> str:
    """The session's default run, uploaded once into a bucket of its own: its URL."""
    bucket = new_bucket()
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    pafs.copy_files(str(default_run), f"{bucket}/run", destination_filesystem=fs)
    return f"s3://{bucket}/run"


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def both(capsys, default_run: Path, s3_run: str, *args) -> tuple[str, str]:
    """stdout of one command on the local run dir and on its copy in the bucket, the copy's URL written as the
    local path (messages name the run dir they read)."""
    outs = []
    for run in (default_run, s3_run):
        rc, out, err = cli(capsys, args[0], run, *args[1:])
        assert rc == 0, err
        outs.append(out.replace(str(run), "RUN"))
    return outs[0], outs[1]


def test_shard_cli_answers_the_same_on_s3(default_run, s3_run, capsys):
    for args in (["ls", "--json"], ["stats", "--json"], ["validate"],
                 ["sample", "--json", "--n", "0", "--decision", "any", "--where", "score_change_global < 0.1"],
                 ["sample", "--json", "--decision", "rejected", "--n", "5", "--seed", "3"]):
        local, remote = both(capsys, default_run, s3_run, *args)
        assert local == remote and local.strip(), args
    assert json.loads(both(capsys, default_run, s3_run, "ls", "--json")[1])[0]["state"] == "committed"


def test_show_and_sample_images_from_s3(default_run, s3_run, tmp_path, capsys):
    ledger = pq.read_table(default_run / "ledger.parquet")
    accepted = ledger.filter(pc.equal(ledger["status"], "accepted"))["pair_id"][0].as_py()
    ended = ledger.filter(pc.equal(ledger["status"], "rejected"))["unit_id"][0].as_py()
    for key in (accepted, ended):
        records = []
        for run, out in ((default_run, tmp_path / "local" / key), (s3_run, tmp_path / "s3" / key)):
            rc, text, err = cli(capsys, "show", run, key, "--out", out)
            assert rc == 0, err
            record = json.loads(text)
            files = record.pop("files")
            records.append((record, {Path(f).name: Path(f).read_bytes() for f in files}))
        assert records[0] == records[1] and (records[0][1] or key == ended)  # an accepted pair's images
    rc, _, err = cli(capsys, "sample", s3_run, "--n", "2", "--images", tmp_path / "images")
    assert rc == 0 and len(list((tmp_path / "images").iterdir())) == 2, err


def test_export_from_and_into_s3(default_run, s3_run, tmp_path, capsys):
    args = ["--task", "color_change", "--task", "subject_removal", "--shard-size", "20"]
    exported = f"s3://{new_bucket()}/export"
    assert cli(capsys, "export", default_run, "--out", tmp_path / "local", *args)[0] == 0
    rc, out, err = cli(capsys, "export", s3_run, "--out", exported, *args)
    assert rc == 0 and out.endswith(f"shards under {exported}/shards\n"), err
    local, remote = store_path(tmp_path / "local"), store_path(exported)
    assert [p.name for p in (remote / "shards").iterdir()] == [p.name for p in (local / "shards").iterdir()]
    for name in (p.name for p in (local / "shards").iterdir()):  # tars and manifests, byte for byte
        assert (remote / "shards" / name).read_bytes() == (local / "shards" / name).read_bytes(), name
    bodies = [json.loads((d / "export.json").read_text()) for d in (local, remote)]
    assert [b.pop("source_run") for b in bodies] == [str(default_run), s3_run] and bodies[0] == bodies[1]
    rc, out, _ = cli(capsys, "validate", exported)
    assert rc == 0 and out.startswith(f"ok: {exported}: {len(bodies[0]['shards'])} shards")
    rc, _, err = cli(capsys, "export", s3_run, "--out", exported, *args)
    assert rc == 1 and f"--out {exported} exists and is not an empty directory" in err


def test_report_from_s3(default_run, s3_run, tmp_path, capsys):
    remote_out = f"s3://{new_bucket()}/report.html"
    pages = []
    for run, out in ((default_run, tmp_path / "local.html"), (s3_run, tmp_path / "s3.html"), (s3_run, remote_out)):
        rc, text, err = cli(capsys, "report", run, "--out", out)
        assert rc == 0 and text.startswith(f"wrote {out} ("), err
        pages.append(store_path(out).read_text().replace(str(run), "RUN"))
    assert pages[0] == pages[1] == pages[2] and pages[0].count('<figure class="card') > 10


def test_a_missing_bucket_or_run_dir_is_named(s3_run, capsys):
    bucket = s3_run.split("/")[2]
    for url in ("s3://no-such-bucket-x2t/run", f"s3://{bucket}/no-such-run"):
        rc, _, err = cli(capsys, "stats", url)
        assert rc == 1 and err == f"error: {url}: no such run dir\n"
    rc, _, err = cli(capsys, "ls", f"{s3_run}/shards")
    assert rc == 1 and f"{s3_run}/shards is not a run dir" in err


def test_trainer_reads_the_same_pairs_from_s3(default_run, s3_run):
    local = index_shards([str(default_run / "shards" / "x2edit-*.tar")])
    remote = index_shards([f"{s3_run}/shards/x2edit-*.tar"])
    assert [p.shard for p in remote] == [f"{s3_run}/shards/{Path(p.shard).name}" for p in local]
    strip = lambda pairs: [{**vars(p), "shard": Path(p.shard).name} for p in pairs]  # noqa: E731
    assert strip(remote) == strip(local) and len(local) > 100
    for i in (0, len(local) // 2, len(local) - 1):
        mine, theirs = PairDataset(local, 64)[i], PairDataset(remote, 64)[i]
        assert mine["key"] == theirs["key"] and mine["instruction"] == theirs["instruction"]
        assert np.array_equal(mine["source"], theirs["source"]) and np.array_equal(mine["target"], theirs["target"])
    with pytest.raises(FileNotFoundError, match="no training shards match"):
        index_shards([f"{s3_run}/shards/nothing-*.tar"])


# ------------------------------------------------------------- stock readers: the README's code, as it is there

def test_ray_data_reads_the_shards_from_s3(default_run, s3_run, ray_cluster):
    import ray.data

    tars = [str(p) for p in store_path(f"{s3_run}/shards").glob("x2edit-*.tar")]
    rows = ray.data.read_webdataset(tars, filesystem=pafs.FileSystem.from_uri(tars[0])[0]).take_all()
    keys = pq.read_table(default_run / "ledger.parquet", filters=pc.field("status") == "accepted")["pair_id"]
    assert sorted(r["__key__"] for r in rows) == sorted(keys.to_pylist())
    assert all(r["mask.png"].shape[:2] == r["src.jpg"].shape[:2] for r in rows)


def test_webdataset_reads_the_shards_from_s3(default_run, s3_run, monkeypatch):
    import webdataset as wds

    def open_s3(url, mode="rb", bufsize=8192, **kw):  # pyarrow's S3 client: endpoint and keys from the environment
        fs, path = pafs.FileSystem.from_uri(url)
        return fs.open_input_stream(path, buffer_size=1 << 20)

    # webdataset has no s3 handler; its gopen module is shadowed by the gopen function, hence sys.modules
    monkeypatch.setitem(sys.modules["webdataset.gopen"].gopen_schemes, "s3", open_s3)
    last = len(store_path(f"{s3_run}/shards").glob("x2edit-*.tar")) - 1
    samples = list(wds.WebDataset(f"{s3_run}/shards/x2edit-{{000000..{last:06d}}}.tar", shardshuffle=False)
                   .decode("pil"))
    local = list(wds.WebDataset(str(default_run / "shards" / f"x2edit-{{000000..{last:06d}}}.tar"),
                                shardshuffle=False))
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in local] and len(local) > 100
    assert all(s["json"]["pair_id"] == s["__key__"] and s["src.jpg"].size == s["mask.png"].size for s in samples)


def test_hf_datasets_reads_the_shards_from_s3_through_pyarrow(default_run, s3_run, tmp_path, monkeypatch):
    """Without s3fs (not installed here), fsspec's "s3" is pyarrow's client behind fsspec's ArrowFSWrapper."""
    import datasets.config
    import fsspec
    from datasets import load_dataset
    from fsspec.implementations.arrow import ArrowFSWrapper

    # The session is offline (conftest: no accidental Hub downloads), which `datasets` applies to every remote
    # URL; this one is the test's own server on 127.0.0.1.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    class ArrowS3(ArrowFSWrapper):
        def __init__(self, **kwargs):  # endpoint and keys from the environment, as pyarrow reads them
            super().__init__(pafs.FileSystem.from_uri("s3://bucket")[0], **kwargs)

    fsspec.register_implementation("s3", ArrowS3, clobber=True)
    tars = [str(p) for p in store_path(f"{s3_run}/shards").glob("x2edit-*.tar")]
    hf = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    keys = pq.read_table(default_run / "ledger.parquet", filters=pc.field("status") == "accepted")["pair_id"]
    assert sorted(hf["__key__"]) == sorted(keys.to_pylist())
    assert all(image.size == mask.size for image, mask in zip(hf["src.jpg"], hf["mask.png"]))
