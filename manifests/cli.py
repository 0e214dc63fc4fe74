"""x2edit-shards: look at a built corpus without Ray or torch.

    x2edit-shards ls RUN                                   # shards: pairs, size, sha256, commit state
    x2edit-shards stats RUN                                # funnel, tasks vs target, editors, rates, scores
    x2edit-shards show RUN PAIR_ID --out DIR               # one record; its images written to DIR
    x2edit-shards sample RUN --task color_change --n 20 --where "score_change_global < 0.1"
    x2edit-shards sample RUN --decision rejected --reason edit_outside_mask --where "score_change_outside > 0.05"
    x2edit-shards validate RUN                             # exit 1 with the precise problems otherwise
    x2edit-shards export RUN --task subject_removal --out DIR
    x2edit-shards report RUN                               # RUN/report.html, self-contained

RUN is a pipeline run dir (recipe.json, shards/, ledger.parquet) or the output of `export`, as a local path or
a URL (`s3://bucket/run`, `gs://…`; endpoint and credentials from the environment, e.g. AWS_ENDPOINT_URL).
`export --out` and `report --out` take a URL too; `show --out` and `sample --images` write local folders.
`--where` is a DuckDB SQL boolean expression over the columns listed in `sample --help`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from manifests.inspect import RunError, open_run
from manifests.schema import ACCEPTED, FAILED, REJECTED
from manifests.storage import store_path

MAX_PROBLEMS = 50  # a systematically broken corpus would otherwise print one line per member


def text_table(rows: list[dict], columns: list[str]) -> str:
    """Left-aligned plain-text columns; None prints as '-'."""
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def cmd_ls(args) -> int:
    from manifests.inspect import list_shards, temp_files

    run = open_run(args.run)
    rows = list_shards(run)
    if args.json:
        _print_json(rows)
        return 0
    print(text_table([{**r, "MB": None if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}",
                       "sha256": r["sha256"] and r["sha256"][:16] + "…"} for r in rows],
                     ["shard", "pairs", "MB", "sha256", "state"]))
    committed = [r for r in rows if r["state"] == "committed"]
    print(f"{len(committed)} of {len(rows)} shards committed, {sum(r['pairs'] for r in committed)} pairs, "
          f"{sum(r['bytes'] for r in committed) / 1e6:.1f} MB"
          + (f"; {len(temp_files(run))} temporary files" if temp_files(run) else ""))
    return 0


def _reason(top: dict | None) -> str | None:
    return top and f"{top['reason']} {top['count']}"


def render_stats(stats: dict) -> str:
    pct = lambda v: None if v is None else f"{v:.1%}"  # noqa: E731
    out = ["units: " + _counts(stats["units"]), "", "funnel",
           text_table([{**f, "rejected": _counts(f["rejected"]), "failed": _counts(f["failed"])}
                       for f in stats["funnel"]], ["stage", "in", "out", "rejected", "failed"]),
           "", "tasks (accepted share vs target share)",
           text_table([{"task": t, **c, "share": pct(c["share"]), "target": pct(c["target_share"])}
                       for t, c in stats["tasks"].items()], ["task", ACCEPTED, REJECTED, FAILED, "share", "target"]),
           "", "editors (yield: accepted / attempted)",
           text_table([{"editor": e, **c, "yield": pct(c["yield"]), "top_reason": _reason(c["top_reason"])}
                       for e, c in stats["editors"].items()],
                      ["editor", ACCEPTED, REJECTED, FAILED, "yield", "top_reason"]),
           *[f"ZERO YIELD: {e} had none of its {c['attempts']} pairs accepted (top reason: {_reason(c['top_reason'])})"
             for e, c in stats["editors"].items() if c[ACCEPTED] == 0],
           "", f"throughput (busy seconds summed over actors; wall {stats['wall_s']} s, "
               f"{stats['pairs_per_s']} accepted pairs/s)",
           text_table([{"stage": s, **t} for s, t in stats["throughput"].items()],
                      ["stage", "units", "busy_s", "units_per_busy_s"])]
    for score, per_task in stats["scores"].items():
        out += ["", f"score {score} (accepted pairs)",
                text_table([{"task": t, "n": d["n"], **{k: f"{d[k]:.4g}" for k in ("min", "p10", "p50", "p90", "max")}}
                            for t, d in per_task.items()], ["task", "n", "min", "p10", "p50", "p90", "max"])]
    return "\n".join(out)


def cmd_stats(args) -> int:
    from manifests.inspect import run_stats

    stats = run_stats(open_run(args.run))
    _print_json(stats) if args.json else print(render_stats(stats))
    return 0


def cmd_show(args) -> int:
    from manifests.show import show_pair

    out = Path(args.out or args.pair_id)
    record = show_pair(open_run(args.run), args.pair_id, out)
    _print_json(record)
    print(f"wrote {len(record['files'])} files to {out}", file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    from manifests.show import show_pair
    from manifests.query import known_values, select_units

    run = open_run(args.run)
    decision = args.decision or (None if args.reason else ACCEPTED)
    rows, matches, mentioned = select_units(run, tasks=args.task, decision=None if decision == "any" else decision,
                                            reason=args.reason, where=args.where, n=args.n, seed=args.seed)
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False, default=str))
    else:
        print(text_table([{**r, "reason": r["reason"] and f"{r['stage']}:{r['reason']}",
                           **{m: None if r[m] is None else f"{r[m]:.4g}" for m in mentioned},
                           "instruction_en": (r["instruction_en"] or "")[:60]} for r in rows],
                         ["unit_id", "decision", "task", "reason", *mentioned, "instruction_en"]))
        print(f"{len(rows)} of {matches} matching units (decision {decision or 'any'}, seed {args.seed})")
    if not matches and args.reason and args.reason not in known_values(run, "reason"):
        print(f"no unit has reason {args.reason!r}; reasons in this run: {', '.join(known_values(run, 'reason'))}",
              file=sys.stderr)
    if args.images:
        for r in rows:
            show_pair(run, r["unit_id"], Path(args.images) / r["unit_id"])
        print(f"wrote the images of {len(rows)} units under {args.images}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from manifests.validate import validate

    run = open_run(args.run)
    problems, counts = validate(run, workers=os.cpu_count() or 1)
    if problems:
        print(f"validate: {len(problems)} problems in {run.root}", file=sys.stderr)
        for line in problems[:MAX_PROBLEMS]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > MAX_PROBLEMS:
            print(f"  … and {len(problems) - MAX_PROBLEMS} more", file=sys.stderr)
        return 1
    ledger = f"; ledger: {_counts(counts['ledger'])}" if "ledger" in counts else "; no ledger (export)"
    print(f"ok: {run.root}: {counts['shards']} shards, {counts.get('pairs', 0)} pairs, {counts.get('members', 0)} "
          f"members, {counts.get('bytes', 0) / 1e6:.1f} MB{ledger}")
    return 0


def cmd_export(args) -> int:
    from manifests.query import export_slice

    body = export_slice(open_run(args.run), args.out, tasks=args.task, where=args.where,
                        shard_size=args.shard_size, prefix=args.prefix)
    print(f"exported {body['pairs']} pairs into {len(body['shards'])} shards under {store_path(args.out) / 'shards'}")
    return 0


def cmd_report(args) -> int:
    from manifests.html_report import write_html_report

    path = write_html_report(args.run, args.out, per_group=args.per_group)
    print(f"wrote {path} ({store_path(path).size() / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x2edit-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("run", help="run dir: a path or a URL (s3://bucket/run)")
        p.set_defaults(handler=handler)
        return p

    command("ls", cmd_ls, "list shards with pair counts, sizes, checksums and commit state").add_argument(
        "--json", action="store_true")
    command("stats", cmd_stats, "funnel, tasks vs target, editors, rates and score distributions").add_argument(
        "--json", action="store_true")
    p = command("show", cmd_show, "print one pair's (or ended unit's) record and write its images")
    p.add_argument("pair_id", help="pair id (or unit id of a sample that ended before it became a pair)")
    p.add_argument("--out", help="folder for the images (default: ./PAIR_ID)")
    p = command("sample", cmd_sample, "select units by task, decision, reason and a SQL expression")
    p.epilog = ("Units are the accepted pairs (manifests) and the rejected/failed units (ledger). --where sees "
                "their columns: task, decision, stage, reason, editor, op, shard, instruction_en, ..., and a "
                "score_<name> column per score (also as plain <name>); a bad expression lists every column.")
    p.add_argument("--task", action="append", help="task name (repeatable)")
    p.add_argument("--decision", choices=(ACCEPTED, REJECTED, FAILED, "any"),
                   help="default: accepted, or any when --reason is given")
    p.add_argument("--reason", help="reason code (rejected) or error class (failed)")
    p.add_argument("--where", help='DuckDB boolean expression, e.g. "score_change_global < 0.1"')
    p.add_argument("--n", type=int, default=20, help="how many (0: all); default 20")
    p.add_argument("--seed", type=int, default=0, help="seed of the deterministic shuffle")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--images", help="also write each unit's images to IMAGES/<unit_id>/")
    command("validate", cmd_validate, "check that the corpus is intact; exit 1 with the problems otherwise")
    p = command("export", cmd_export, "write the accepted pairs of a slice as new shards + manifests")
    p.add_argument("--out", required=True, help="new, empty directory (a path or a URL)")
    p.add_argument("--task", action="append", help="task name (repeatable)")
    p.add_argument("--where", help="DuckDB boolean expression (see sample --help)")
    p.add_argument("--shard-size", type=int, default=100, help="pairs per shard; default 100")
    p.add_argument("--prefix", help="shard name prefix (default: the run's)")
    p = command("report", cmd_report, "write a self-contained HTML report")
    p.add_argument("--out", help="HTML file, a path or a URL (default: RUN/report.html)")
    p.add_argument("--per-group", type=int, default=8, help="gallery units per (task, decision, reason)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `x2edit-shards sample --json RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
