"""`x2edit-shards report`: one self-contained HTML page per run.

The funnel, accepted pairs per task against the target, a histogram per score (PNG, accepted vs ended units)
and a gallery of pairs (source | edited | mask) with instruction, task, decision, reason and scores,
filterable by task, decision and reason in plain JS (the filter also reads the URL hash, e.g.
`report.html#task=color_change&decision=rejected`). Images are inlined as small JPEG thumbnails and the gallery
keeps at most `per_group` units per (task, decision, reason), so the page of a large run stays small.
Nothing is fetched from the network.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from manifests.commit import atomic_write_bytes
from manifests.images import contact_thumb
from manifests.inspect import SCORE_PREFIX, Run, ended_rows, open_run, read_members, run_stats
from manifests.query import connect, quote_ident
from manifests.schema import ACCEPTED, FAILED, REJECTED
from manifests.storage import StorePath

TEMPLATE = Path(__file__).with_name("report_template.html")
THUMB_HEIGHT = 96
COLORS = {ACCEPTED: (76, 120, 168), REJECTED: (245, 133, 24), FAILED: (214, 39, 40)}


def write_html_report(run_dir: str | Path | StorePath, out: str | Path | StorePath | None = None,
                      per_group: int = 8) -> str | Path | StorePath:
    """Render the run's report page to `out` (a local path or a URL; default `<run_dir>/report.html`, in the
    run dir's store); returns where it wrote."""
    run = open_run(run_dir)
    out = out or run.root / "report.html"
    atomic_write_bytes(out, render_html(run, per_group).encode())
    return out


def render_html(run: Run, per_group: int) -> str:
    con, names = connect(run)
    gallery = _gallery(run, con, per_group)
    stats = run_stats(run) if run.ledger_path else None
    histograms = []
    for name in names:
        column = quote_ident(SCORE_PREFIX + name)
        rows = con.execute(f"SELECT decision, {column} FROM units WHERE {column} IS NOT NULL").fetchnumpy()
        series = {d: rows[f"{SCORE_PREFIX}{name}"][rows["decision"] == d] for d in COLORS}
        histograms.append(f'<img alt="histogram of {html.escape(name)}" '
                          f'src="{_data_uri(histogram_png(name, series), "png")}">')
    accepted = con.execute(f"SELECT count(*) FROM units WHERE decision = '{ACCEPTED}'").fetchone()[0]
    recipe = run.report_json() or {}
    fields = {
        "title": html.escape(f"x2edit corpus {run.root.name}"),
        "summary": html.escape(f"{run.root}: recipe {recipe.get('recipe', '?')} "
                               f"({recipe.get('recipe_hash', '?')}); {accepted} accepted pairs in "
                               f"{len(run.manifests())} shards; gallery: {len(gallery)} units (at most {per_group} "
                               "per task, decision and reason)"),
        "funnel": _funnel_table(stats) if stats else "<p>No ledger in this run dir.</p>",
        "tasks": _task_table(stats) if stats else "",
        "histograms": "\n".join(histograms) or "<p>No scores.</p>",
        "task_options": _options(r["task"] for r in gallery),
        "decision_options": _options(r["decision"] for r in gallery),
        "reason_options": _options(r["reason"] for r in gallery),
        "total": str(len(gallery)),
        "cards": "\n".join(_card(r) for r in gallery),
    }
    return Template(TEMPLATE.read_text()).substitute(fields)


def _gallery(run: Run, con, per_group: int) -> list[dict]:
    """At most per_group pairs per (task, decision, reason), each with its `thumb`: source | edited | region mask
    from the shard for accepted pairs, the pipeline's src | edited thumb for ended ones.

    Accepted pairs are taken from the first rows of the first shards: every shard carries the task mix and
    holds a task's pairs in pair-id (hash) order, so this is an unbiased pick that reads few tars, and only
    their beginnings. Ended units are picked by a hash of their id."""
    gallery = con.sql(
        "SELECT unit_id, pair_id, decision, stage, reason, message, shard, task, instruction_en, instruction_zh, "
        "scores, region_mask FROM units WHERE pair_id IS NOT NULL QUALIFY row_number() OVER (PARTITION BY task, decision, "
        "reason ORDER BY shard NULLS LAST, _row NULLS LAST, md5(unit_id)) <= ? "
        "ORDER BY task, decision, reason, md5(unit_id)", params=[per_group]).to_arrow_table().to_pylist()
    ended = ended_rows(run, [r["unit_id"] for r in gallery if r["decision"] != ACCEPTED], ["thumb", "instruction_zh"])
    by_shard: dict[str, set[str]] = {}
    for r in gallery:
        if r["decision"] == ACCEPTED:
            by_shard.setdefault(r["shard"], set()).add(r["pair_id"])
    members = {key: files for shard, keys in sorted(by_shard.items())
               for key, files in read_members(run, shard, keys).items()}
    for r in gallery:
        if r["decision"] == ACCEPTED:
            files = members.get(r["pair_id"], {})
            shown = ("src.jpg", "edited.jpg") + (("mask.png",) if r["region_mask"] else ())  # not a blank mask
            images = [files[n] for n in (f"{r['pair_id']}.{f}" for f in shown) if n in files]
            r["thumb"] = contact_thumb(images, height=THUMB_HEIGHT) if images else None
        else:  # the ledger does not keep the Chinese instruction of ended units; their last stage row does
            last = ended.get(r["unit_id"], {})
            r["thumb"], r["instruction_zh"] = last.get("thumb"), last.get("instruction_zh")
    return gallery


def histogram_png(name: str, series: dict[str, np.ndarray], bins: int = 24,
                  size: tuple[int, int] = (360, 170)) -> bytes:
    """Stacked histogram of one score, one colour per decision, drawn with Pillow (no plotting dependency)."""
    values = np.concatenate(list(series.values())).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    counts = {d: np.histogram(v, edges)[0] for d, v in series.items() if v.size}
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, top, right, bottom = 10, 34, size[0] - 10, size[1] - 18
    draw.text((left, 4), name, fill="black", font=font)
    legend = "   ".join(f"{d} {int(c.sum())}" for d, c in counts.items())
    draw.text((left, 18), legend, fill=(90, 90, 90), font=font)
    peak = max(1, int(sum(counts.values()).max())) if counts else 1
    width = (right - left) / bins
    for i in range(bins):
        y = bottom
        for decision, c in counts.items():
            h = (bottom - top) * c[i] / peak
            if c[i]:
                draw.rectangle([left + i * width + 1, y - h, left + (i + 1) * width - 1, y], fill=COLORS[decision])
            y -= h
    draw.line([left, bottom, right, bottom], fill="black")
    draw.text((left, bottom + 3), f"{edges[0]:.4g}", fill="black", font=font)
    label = f"{edges[-1]:.4g}"
    draw.text((right - draw.textlength(label, font=font), bottom + 3), label, fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _options(values) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>'
                   for v in sorted({v for v in values if v}))


def _card(row: dict) -> str:
    esc = lambda v: html.escape(str(v)) if v is not None else ""  # noqa: E731
    scores = json.loads(row["scores"]) if row["scores"] else {}
    score_rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(scores.items())
                         if isinstance(v, (int, float)))
    image = (f'<img loading="lazy" alt="{esc(row["pair_id"])}" src="{_data_uri(row["thumb"], "jpeg")}">' if row["thumb"]
             else '<div class="noimg">no images: the unit ended before they existed</div>')
    verdict = esc(row["decision"]) + (f" at {esc(row['stage'])}: <b>{esc(row['reason'])}</b>" if row["reason"] else "")
    return (f'<figure class="card {esc(row["decision"])}" data-task="{esc(row["task"])}" '
            f'data-decision="{esc(row["decision"])}" data-reason="{esc(row["reason"])}">{image}<figcaption>'
            f'<div class="meta"><span class="task">{esc(row["task"])}</span> · {verdict}</div>'
            f'<p class="en">{esc(row["instruction_en"])}</p><p class="zh">{esc(row["instruction_zh"])}</p>'
            + (f'<p class="why">{esc(row["message"])}</p>' if row["message"] else "")
            + f'<details><summary>scores</summary><table>{score_rows}</table></details>'
            f'<code>{esc(row["pair_id"])}</code></figcaption></figure>')


def _table(headers: list[str], rows: list[list]) -> str:
    """An HTML table; cells are inserted as given (callers escape text)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _funnel_table(stats: dict) -> str:
    counts = lambda d: ", ".join(f"{html.escape(k)} {v}" for k, v in d.items()) or "—"  # noqa: E731
    busy = {s: t["busy_s"] for s, t in stats["throughput"].items()}
    return _table(["stage", "in", "out", "rejected", "failed", "busy s"],
                  [[f["stage"], f["in"], f["out"], counts(f["rejected"]), counts(f["failed"]), busy.get(f["stage"], "")]
                   for f in stats["funnel"]])


def _task_table(stats: dict) -> str:
    rows = []
    for task, c in stats["tasks"].items():
        target = c["target_share"]
        bar = (f'<div class="bar"><div class="share" style="width:{c["share"] * 100:.1f}%"></div>'
               + (f'<div class="target" style="left:{target * 100:.1f}%"></div>' if target is not None else "")
               + "</div>")
        rows.append([html.escape(task), c[ACCEPTED], c[REJECTED], c[FAILED], f"{c['share']:.1%}",
                     "—" if target is None else f"{target:.1%}", bar])
    return _table(["task", "accepted", "rejected", "failed", "share", "target", "share (bar) vs target (line)"], rows)
