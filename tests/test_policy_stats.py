"""`x2edit-shards stats` per editor: the yield, and an editor whose every pair the policy rejects stands out."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.cli import main
from manifests.inspect import open_run, run_stats

BLUR, REPLACE = "classical:background.blur", "classical:background.replace"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir with only what stats reads: the shard prefix and a ledger where the blur never passes."""
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": {"pack": {"prefix": "x"}}}))
    (tmp_path / "shards").mkdir()
    ends = [(BLUR, "rejected", "background_unchanged")] * 3 + [(BLUR, "rejected", "no_op_edit")]
    ends += [(REPLACE, "accepted", None)] * 3 + [(REPLACE, "failed", "RuntimeError")]
    rows = [{"sample_id": f"s{i}", "pair_id": f"p{i}", "status": status, "task": "background_change",
             "stage": None if status == "accepted" else "score", "reason": reason, "editor": editor,
             **{f"t_{s}": 0.01 for s in ("source", "instruct", "edit", "score")}}
            for i, (editor, status, reason) in enumerate(ends)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ledger.parquet")
    return tmp_path


def test_stats_give_each_editor_its_yield_and_top_reason(run_dir):
    editors = run_stats(open_run(run_dir))["editors"]
    assert editors[BLUR] == {"accepted": 0, "rejected": 4, "failed": 0, "attempts": 4, "yield": 0.0,
                             "top_reason": {"reason": "background_unchanged", "count": 3}}
    assert editors[REPLACE]["yield"] == 0.75 and editors[REPLACE]["top_reason"] == {"reason": "RuntimeError",
                                                                                    "count": 1}


def test_stats_print_a_zero_yield_editor_after_the_table(run_dir, capsys):
    assert main(["stats", str(run_dir)]) == 0
    out = capsys.readouterr().out
    table = out.split("\neditors")[1].split("\n\n")[0].splitlines()
    assert "yield" in table[1] and any(line.startswith(REPLACE) and "75.0%" in line for line in table)
    flagged = [line for line in table if line.startswith("ZERO YIELD")]
    assert flagged == [f"ZERO YIELD: {BLUR} had none of its 4 pairs accepted (top reason: background_unchanged 3)"]
