"""The run report: the funnel per stage, accepted pairs per task against the target, time per stage."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from manifests.commit import atomic_write_bytes
from manifests.inspect import funnel
from manifests.schema import ACCEPTED, ROW_STAGES
from manifests.storage import StorePath
from manifests.taxonomy import TASKS


# what build_report reads of the ledger (funnel's columns included): not its text, read back from its file
REPORT_COLUMNS = ("sample_id", "pair_id", "status", "stage", "reason", "task", "warnings",
                  *(f"t_{s}" for s in ROW_STAGES))


def build_report(recipe, ledger: pa.Table, shards: list[dict], covered: frozenset[str],
                 targets: dict[str, float], weights: dict[str, float], walls: list[dict],
                 balance: list[dict] = ()) -> dict:
    """`targets`: the accepted share the recipe asks for per task; `weights`: how often each is attempted
    open loop; `balance`: each window's weights and yield estimates in a closed-loop run."""
    status = Counter(ledger.column("status").to_pylist())
    accepted_tasks = Counter(t for t, s in zip(ledger.column("task").to_pylist(),
                                               ledger.column("status").to_pylist()) if s == ACCEPTED)
    accepted = status.get(ACCEPTED, 0)
    total_weight = sum(weights.values()) or 1.0
    per_task = {t: {"accepted": accepted_tasks.get(t, 0),
                    "share": round(accepted_tasks.get(t, 0) / accepted, 4) if accepted else 0.0,
                    "target_share": round(targets.get(t, 0.0), 4),
                    "attempt_share": round(weights.get(t, 0.0) / total_weight, 4)}
                for t in sorted(set(targets) | set(accepted_tasks))}
    busy = {s: round(sum(v for v in ledger.column(f"t_{s}").to_pylist() if v), 3)
            for s in ROW_STAGES}
    wall = round(sum(w["wall_s"] for w in walls), 3)
    warnings = Counter(w.split(":", 1)[0] for ws in ledger.column("warnings").to_pylist() for w in (ws or []))
    return {
        "recipe": recipe.name, "recipe_hash": recipe.hash(),
        "units": dict(status), "accepted": accepted, "funnel": funnel(ledger),
        "accepted_per_task": per_task,
        "tasks_not_covered": [t.name for t in TASKS[1:] if t.name not in covered],
        "shards": {"count": len(shards), "pairs": sum(s["pairs"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards)},
        "busy_seconds_per_stage": busy, "wall_seconds": wall, "invocations": walls,
        "pairs_per_second": round(accepted / wall, 3) if wall else None,
        "warnings": dict(warnings),  # by code: odd inputs (bad sidecars, animated images) and unread judge replies
        "balance": list(balance),
    }


def render_markdown(report: dict) -> str:
    lines = [f"# Run report — recipe {report['recipe']} ({report['recipe_hash']})", "",
             f"Accepted pairs: **{report['accepted']}** in {report['shards']['count']} shards "
             f"({report['shards']['bytes'] / 1e6:.1f} MB); wall {report['wall_seconds']:.1f} s, "
             f"{report['pairs_per_second']} pairs/s.", "", "## Funnel", "",
             "| stage | in | out | rejected | failed | busy s |", "|---|---|---|---|---|---|"]
    for f in report["funnel"]:
        rej = ", ".join(f"{k} {v}" for k, v in f["rejected"].items()) or "—"
        fail = ", ".join(f"{k} {v}" for k, v in f["failed"].items()) or "—"
        busy = report["busy_seconds_per_stage"].get(f["stage"], "")
        lines.append(f"| {f['stage']} | {f['in']} | {f['out']} | {rej} | {fail} | {busy} |")
    lines += ["", "## Accepted pairs per task", "",
              "Target: the share of accepted pairs the recipe asks for. Attempted: the share of candidate pairs "
              "given to the task (target / expected yield).", "",
              "| task | accepted | share | target | attempted |", "|---|---|---|---|---|"]
    for task, v in report["accepted_per_task"].items():
        lines.append(f"| {task} | {v['accepted']} | {v['share']:.1%} | {v['target_share']:.1%} "
                     f"| {v['attempt_share']:.1%} |")
    lines += ["", "Tasks not covered by the configured editors: " + (", ".join(report["tasks_not_covered"]) or "none")]
    if report.get("balance"):
        lines += ["", "## Closed-loop balancing: yield estimate per task before each window", "",
                  "| window | " + " | ".join(report["balance"][0]["yield_estimates"]) + " |",
                  "|---|" + "---|" * len(report["balance"][0]["yield_estimates"])]
        lines += [f"| {w['window']} | " + " | ".join(f"{y:.2f}" for y in w["yield_estimates"].values()) + " |"
                  for w in report["balance"]]
    if report["warnings"]:
        counts = ", ".join(f"{k} {v}" for k, v in report["warnings"].items())
        lines += ["", f"Warnings (units carrying each code): {counts}"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: StorePath, report: dict) -> str:
    text = render_markdown(report)
    atomic_write_bytes(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False).encode())
    atomic_write_bytes(run_dir / "report.md", text.encode())
    return text
