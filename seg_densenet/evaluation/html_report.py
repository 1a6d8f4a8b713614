"""``report.html``: one self-contained page of an evaluation to look at in any browser.

It holds the summary tables (``summary.md``'s), one row per patient that sorts by any column on a
click, an overlay strip of every case (ED and ES, RV, myocardium and LV in their own colours: the
prediction filled, the ground truth as contour lines) and the Dice box plot and Bland-Altman plots.
Images are embedded as ``data:`` URIs and the sorting is a few lines of inline JavaScript, so the file
can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from seg_densenet.data.labels import report_phases
from seg_densenet.utils.atomic import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.sortable th { cursor: pointer; background: #f2f2f2; user-select: none; }
table.sortable th:after { content: " \\2195"; color: #999; }
figure { margin: 0.5em 0 1.2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
.plots figure { display: inline-block; width: 48%; margin-right: 1%; vertical-align: top; }
"""

_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var ascending = th.dataset.order !== "asc";
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return ascending ? c : -c;
      });
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = ascending ? "asc" : "desc";
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
// a link to report.html#sort=<column> (#sort=-<column>: descending) opens the patients sorted
(function () {
  var match = decodeURIComponent(location.hash).match(/^#sort=(-?)(.+)$/);
  if (!match) { return; }
  document.querySelectorAll("#patients th").forEach(function (th) {
    if (th.textContent === match[2]) { th.click(); if (match[1]) { th.click(); } }
  });
})();
"""


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def markdown_to_html(text: str) -> str:
    """The subset of markdown ``summary.md`` uses: headings, pipe tables, bullet lists, paragraphs."""
    out: list[str] = []
    table: list[list[str]] = []
    bullets: list[str] = []

    def flush() -> None:
        if table:
            head, rows = table[0], [r for r in table[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</tbody></table>"
            )
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            table.append([c.strip() for c in stripped.strip("|").split("|")])
            continue
        if stripped.startswith("- "):
            bullets.append(stripped[2:])
            continue
        flush()
        if stripped.startswith("#"):
            level = min(len(stripped) - len(stripped.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{_inline(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped:
            out.append(f"<p>{_inline(stripped)}</p>")
    flush()
    return "\n".join(out)


def _inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def patient_rows(
    metric_rows: Sequence[dict], clinical_rows: Sequence[dict], structures: Sequence[str]
) -> tuple[list[str], list[list]]:
    """Columns and one row per patient: Dice and HD95 per structure and phase, and the clinical indices
    (prediction, ground truth)."""
    phases = report_phases(r["phase"] for r in metric_rows)
    columns = ["patient"]
    columns += [f"Dice {s} {p}" for s in structures for p in phases]
    columns += [f"HD95 {s} {p}" for s in structures for p in phases]
    clinical_keys = [
        k for k in ("LV_EF_pct", "RV_EF_pct", "LV_EDV_ml", "MYO_mass_g") if any(k in r for r in clinical_rows)
    ]
    columns += [f"{k} {src}" for k in clinical_keys for src in ("pred", "gt")]
    rows = []
    for case in sorted({r["case"] for r in metric_rows}):
        cells: list = [case]
        found = {(r["structure"], r["phase"]): r for r in metric_rows if r["case"] == case}
        for key in ("dice", "hd95_mm"):
            cells += [found.get((s, p), {}).get(key, math.nan) for s in structures for p in phases]
        clinical = {r["source"]: r for r in clinical_rows if r["patient"] == case}
        cells += [clinical.get(src, {}).get(k, math.nan) for k in clinical_keys for src in ("pred", "gt")]
        rows.append(cells)
    return columns, rows


def _cell(value) -> str:
    if isinstance(value, float):
        text = "–" if not math.isfinite(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        sort_key = f"{value!r}" if math.isfinite(value) else "-1e99"
        return f'<td data-value="{sort_key}">{text}</td>'
    return f'<td data-value="{html.escape(str(value))}">{html.escape(str(value))}</td>'


def write_html_report(
    path: Path,
    summary_markdown: str,
    metric_rows: Sequence[dict],
    clinical_rows: Sequence[dict],
    structures: Sequence[str],
    case_strips: Mapping[str, bytes],
    figures: Mapping[str, bytes],
) -> Path:
    """Write ``report.html``; ``case_strips`` maps a case to its overlay-strip PNG, ``figures`` a caption
    to a plot PNG."""
    columns, rows = patient_rows(metric_rows, clinical_rows, structures)
    table = (
        '<table class="sortable" id="patients"><thead><tr>'
        + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
        + "</tbody></table>"
    )
    strips = "".join(
        f'<figure id="case-{html.escape(case)}"><img alt="{html.escape(case)} overlays" '
        f'src="{png_data_uri(png)}"><figcaption>{html.escape(case)}</figcaption></figure>'
        for case, png in case_strips.items()
    )
    plots = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="{png_data_uri(png)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, png in figures.items()
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>seg_densenet evaluation</title>
<style>{_STYLE}</style></head><body>
{markdown_to_html(summary_markdown)}
<h2>Patients</h2>
<p>One row per patient; click a column to sort by it (again to reverse).</p>
{table}
<h2>Plots</h2>
<div class="plots">{plots or "<p>No plots (plots=false).</p>"}</div>
<h2>Every case</h2>
<p>ED and ES slices; RV blue, myocardium green, LV red; the prediction filled, the ground truth as lines.</p>
{strips or "<p>No overlays (plots=false).</p>"}
<script>{_SORT_SCRIPT}</script>
</body></html>
"""
    atomic_write_text(path, page)
    return path
