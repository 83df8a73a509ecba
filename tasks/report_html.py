"""The report page (tasks/report.py gathers what it shows): one HTML file with its CSS inline, charts as
SVG and thumbnails as JPEG, both in ``data:`` URIs; no script, no external reference. Every text that comes
from the data (keys, captions, errors, reasons, paths) goes through ``html.escape``."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

from schemas.config import Bounds
from tasks.report import CAPTION_SAMPLE, KEPT_SAMPLE, REJECTS_PER_REASON, ReportData, Tile
from tasks.report_images import THUMB_SIDE

CSS = f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 6px; }}
.tile {{ margin: 0; width: {THUMB_SIDE}px; }}
.tile img, .tile .ph {{ width: {THUMB_SIDE}px; height: {THUMB_SIDE}px; object-fit: contain; background: #eee; }}
.tile .ph {{ display: flex; align-items: center; justify-content: center; text-align: center;
  font-size: 11px; color: #933; overflow: hidden; word-break: break-word; padding: 4px; box-sizing: border-box;
  border: 1px dashed #c99; }}
.tile figcaption {{ font-size: 11px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.hists {{ display: flex; flex-wrap: wrap; gap: 10px; }} .hist img {{ width: 400px; }}
.bar {{ background: #4a78b5; height: 12px; }}
.note, .empty {{ color: #666; }} .empty {{ font-size: 1.2em; }}
td.cap {{ max-width: 360px; word-break: break-word; }}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _tile(tile: Tile) -> str:
    body = f'<img src="{tile.image}" alt="{_e(tile.key)}">' if tile.image else f'<div class="ph">{_e(tile.note)}</div>'
    return (f'<figure class="tile" data-key="{_e(tile.key)}" title="{_e(tile.hover)}">{body}'
            f"<figcaption>{_e(tile.key)}</figcaption></figure>")


def _grid(tiles: list[Tile], total: int, cap: int, how: str) -> str:
    note = (f'<p class="note">{len(tiles)} of {total:,} rows shown (at most {cap}, {how}); hover a tile for its '
            "signals.</p>")
    return note + '<div class="grid">' + "".join(_tile(t) for t in tiles) + "</div>"


def histogram_svg(column: str, sides: list[tuple[str, list[float], list[int]]], rule: Bounds | None) -> str:
    """A stacked histogram (kept, rejected) as an SVG data URI; the rule's bounds are dashed lines
    (``id="rule-min"``, ``id="rule-max"`` in the SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colors = {"kept": "#4a78b5", "rejected": "#e0893a"}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "t2i-report", "font.size": 9,
                                 "font.sans-serif": ["DejaVu Sans", "sans-serif"]}):
        fig, ax = plt.subplots(figsize=(4.6, 2.5))
        try:
            edges = sides[0][1]
            bottom = [0] * len(sides[0][2])
            for name, _, counts in sides:  # one path per side (a bar each would be 30 paths)
                top = [a + b for a, b in zip(bottom, counts, strict=True)]
                ax.stairs(top, edges, baseline=bottom, fill=True, color=colors[name], label=name, linewidth=0)
                bottom = top
            lo, hi = edges[0], edges[-1]
            near = (lo - (hi - lo) / 2, hi + (hi - lo) / 2)  # a bound further off would squash the bars: noted
            for side in ("min", "max"):
                value = getattr(rule, side) if rule else None
                if value is None:
                    continue
                if near[0] <= value <= near[1]:
                    ax.axvline(value, color="#c00", linestyle="--", linewidth=1.5, gid=f"rule-{side}")
                    lo, hi = min(lo, value), max(hi, value)
                else:
                    below = value < near[0]
                    text = f"{side} {value:.6g} (off scale)"
                    ax.annotate("\u2190 " + text if below else text + " \u2192",
                                xy=(0.0 if below else 1.0, 1.02), xycoords="axes fraction", color="#c00",
                                ha="left" if below else "right", va="bottom", fontsize=7, gid=f"rule-{side}")
            pad = (hi - lo) * 0.03
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_title(column)
            ax.set_ylabel("rows")
            ax.legend(frameon=False)
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
        finally:
            plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue().encode("utf-8")).decode("ascii")


def _rule_text(column: str, rule: Bounds | None) -> str:
    if rule is None:
        return "no rule"
    parts = ([f"{rule.min:.6g} &le;"] if rule.min is not None else []) + [_e(column)] + (
        [f"&le; {rule.max:.6g}"] if rule.max is not None else [])
    return "rule: " + " ".join(parts) + " (dashed red line)"


def _counts(data: ReportData) -> str:
    s = data.stats
    rows = [("output", data.out), ("mode", data.mode), ("source", data.source), ("kept", s["kept"]),
            ("rejected", s["rejected"]), ("kept fraction", s["kept_fraction"]),
            ("duplicate keys in shards", s["duplicate_keys"])]
    body = "".join(f'<tr><th>{k}</th><td class="n" data-field="{k.replace(" ", "_")}">{_e(_fmt(v))}</td></tr>'
                   for k, v in rows)
    return f'<section id="counts"><h2>Counts</h2><table>{body}</table></section>'


def _reasons(data: ReportData) -> str:
    if not data.reasons:
        return '<section id="reasons"><h2>Reject reasons</h2><p class="note">No rejected rows.</p></section>'
    total = data.stats["rejected"] or 1
    table = "".join(f'<tr><td><a href="#reason-{_e(r)}">{_e(r)}</a></td><td class="n">{n:,}</td>'
                    f'<td class="n">{n / total:.1%}</td></tr>' for r, n, _ in data.reasons)
    out = [f'<section id="reasons"><h2>Reject reasons</h2><table><tr><th>reason</th><th>rows</th><th>share</th>'
           f"</tr>{table}</table>"]
    for reason, n, tiles in data.reasons:
        out.append(f'<div class="reason" id="reason-{_e(reason)}" data-reason="{_e(reason)}"><h3>{_e(reason)}</h3>'
                   + _grid(tiles, n, REJECTS_PER_REASON, "from the fewest source shards, images read again from "
                           "the source") + "</div>")
    return "".join(out) + "</section>"


def _signals(data: ReportData) -> str:
    figs = []
    for column in data.signals:
        sides = data.histograms.get(column)
        if not sides:
            continue
        rule = data.rules.get(column)
        n = sum(sum(c) for _, _, c in sides)
        figs.append(f'<figure class="hist" data-column="{_e(column)}" data-rule="{"yes" if rule else "no"}">'
                    f'<img src="{histogram_svg(column, sides, rule)}" alt="histogram of {_e(column)}">'
                    f"<figcaption>{_e(column)}: {n:,} values; {_rule_text(column, rule)}</figcaption></figure>")
    return ('<section id="signals"><h2>Signals</h2><p class="note">Kept and rejected rows stacked; the config\'s '
            'rule bounds drawn where it has one.</p><div class="hists">' + "".join(figs) + "</div></section>")


def _buckets(data: ReportData) -> str:
    buckets = data.stats["buckets"]
    if not buckets:
        return '<section id="buckets"><h2>Buckets</h2><p class="note">No kept rows.</p></section>'
    top = max(b["rows"] for b in buckets) or 1
    rows = "".join(f'<tr><td>{_e(b["bucket"])}</td><td class="n">{b["rows"]:,}</td>'
                   f'<td style="width:320px"><div class="bar" style="width:{100 * b["rows"] / top:.1f}%"></div>'
                   "</td></tr>"
                   for b in buckets)
    return (f'<section id="buckets"><h2>Buckets</h2><table><tr><th>bucket (w x h)</th><th>rows</th><th></th></tr>'
            f"{rows}</table></section>")


def _kept(data: ReportData) -> str:
    return ('<section id="kept"><h2>Kept images</h2>'
            + _grid(data.kept, data.stats["kept"], KEPT_SAMPLE, "by hash of the key") + "</section>")


def _captions(data: ReportData) -> str:
    if not data.captions:
        return ""
    out = ['<section id="captions"><h2>Machine captions</h2>']
    for name, rows in data.captions.items():
        figures = data.stats.get("caption_sets", {}).get(name, {})
        out.append(f'<h3>caption set {_e(name)}</h3><p class="note">{len(rows)} of {figures.get("rows", 0):,} '
                   f"captioned rows shown (at most {CAPTION_SAMPLE}, by hash of the key).</p>")
        body = "".join(
            f'<tr data-key="{_e(r["key"])}"><td>{_tile(r["tile"])}</td><td class="cap">{_e(r.get("caption"))}</td>'
            f'<td class="cap">{_e(r.get("recaption_en"))}</td><td class="cap">{_e(r.get("recaption_zh"))}</td>'
            f'<td class="cap">{_e(r.get("caption_error"))}</td></tr>' for r in rows)
        out.append(f'<table class="captions" data-set="{_e(name)}"><tr><th>image</th><th>original caption</th>'
                   f"<th>recaption_en</th><th>recaption_zh</th><th>error</th></tr>{body}</table>")
    return "".join(out) + "</section>"


def render(data: ReportData) -> str:
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>t2i report: {_e(data.out)}'
            f"</title><style>{CSS}</style></head><body><h1>Curation report</h1>")
    parts = [head, _counts(data)]
    if not data.stats["kept"] and not data.stats["rejected"]:
        parts.append('<p class="empty" id="empty">This output has no rows: no committed part holds any '
                     "(nothing curated yet, or every part is empty).</p>")
    else:
        parts += [_reasons(data), _signals(data), _buckets(data), _kept(data), _captions(data)]
    return "".join(parts) + "</body></html>\n"
