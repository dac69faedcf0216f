"""The cohort report, `report.html`: one self-contained page to review a run's cases, flagged and failed ones first,
which MONAI does not write."""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from collections.abc import Mapping, Sequence

from scripts import atomic_write
from scripts.labels import SIDES
from scripts.qc.check import CaseRow

OK_COLOUR, FLAGGED_COLOUR = "#1f77b4", "#d62728"
# each case's picture is put in its <img> when it scrolls into view: a page of 1,000 cases opens at once
LAZY_SCRIPT = """
const observer = new IntersectionObserver((entries) => entries.forEach((entry) => {
  if (entry.isIntersecting) { entry.target.src = entry.target.dataset.src; observer.unobserve(entry.target); }
}), {rootMargin: "800px"});
document.querySelectorAll("img[data-src]").forEach((img) => observer.observe(img));
"""
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 13px; }
tr.review { background: #fde2e1; } tr.failed, tr.fail { background: #f8c4c0; }
img { width: 600px; min-height: 40px; display: block; }
.plots svg { width: 480px; height: auto; margin-right: 1em; }
.summary span { margin-right: 2em; font-size: 18px; }
"""


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _scatter(ax, points: Sequence[tuple[float, float, bool]], label: str, marker: str = "o") -> None:
    for flagged in (False, True):
        chosen = [(x, y) for x, y, f in points if f == flagged]
        if chosen:
            ax.scatter(
                *zip(*chosen),
                s=30 if flagged else 14,
                marker=marker,
                alpha=0.8,
                c=FLAGGED_COLOUR if flagged else OK_COLOUR,
                label=f"{label}{' (flagged)' if flagged else ''}",
            )


def plots(rows: Sequence[CaseRow]) -> list[str]:
    """SVG plots: for heads, each side's hippocampus against eTIV and left against right; for crops, anterior
    against posterior; flagged cases in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [r for r in rows if r.kind == "head" and r.etiv_mm3]
    crops = [r for r in rows if r.kind == "crop"]
    figures = []
    if heads:
        figure, ax = plt.subplots(figsize=(5, 4))
        for side, marker in zip(SIDES, ("o", "^")):
            _scatter(ax, [(r.etiv_mm3 / 1000, r.volume(side), r.qc != "pass") for r in heads], side, marker)
        ax.set(xlabel="eTIV (cm³)", ylabel="hippocampus (mm³)", title="Each side against eTIV")
        ax.legend(fontsize=8)
        figures.append(_svg(figure))
        figure, ax = plt.subplots(figsize=(5, 4))
        _scatter(ax, [(r.volume("left"), r.volume("right"), r.qc != "pass") for r in heads], "case")
        limits = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(limits, limits, color="#999", linewidth=0.8)
        ax.set(xlabel="left (mm³)", ylabel="right (mm³)", title="Left against right")
        ax.legend(fontsize=8)
        figures.append(_svg(figure))
    if crops:
        figure, ax = plt.subplots(figsize=(5, 4))
        _scatter(ax, [(r.volume(part="anterior"), r.volume(part="posterior"), r.qc != "pass") for r in crops], "crop")
        ax.set(xlabel="anterior (mm³)", ylabel="posterior (mm³)", title="Crops: anterior against posterior")
        ax.legend(fontsize=8)
        figures.append(_svg(figure))
    return figures


def _picture(png_file: str | None, lazy: bool) -> str:
    """The QC picture as a 600-pixel JPEG in the page (half the PNG's size: 23 KB a crop)."""
    if not png_file or not os.path.isfile(png_file):
        return ""
    from PIL import Image

    with Image.open(png_file) as image:
        thumbnail = image.convert("RGB")
    thumbnail.thumbnail((600, 600))
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=80)
    source = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img data-src="{source}" alt="QC picture">' if lazy else f'<img src="{source}" alt="QC picture">'


def _volumes(row: CaseRow) -> str:
    if row.kind == "head":
        text = ", ".join(f"{side} {row.volume(side):.0f}" for side in SIDES)
        if row.kind != "head":
            return text + " mm³"
        return text + (f" mm³; eTIV {row.etiv_mm3 / 1000:.0f} cm³" if row.etiv_mm3 else " mm³; eTIV withheld")
    return f"anterior {row.volume(part='anterior'):.0f}, posterior {row.volume(part='posterior'):.0f} mm³"


def _case_row(row: CaseRow, picture: str) -> str:
    columns = row.columns()
    return (
        f'<tr class="{row.qc}"><td>{html.escape(row.case)}</td><td>{row.kind}</td><td>{row.qc}</td>'
        f'<td>{columns.get("qc_score", "")}</td><td>{html.escape(row.qc_reasons)}</td><td>{_volumes(row)}</td>'
        f'<td>{columns["confidence"]}</td><td>{picture}</td></tr>'
    )


HEADER = (
    "<tr><th>case</th><th>kind</th><th>QC</th><th>QC score (estimated Dice)</th><th>reasons</th><th>volumes</th>"
    "<th>confidence</th><th>picture</th></tr>"
)


def _by_score(row: CaseRow) -> tuple:
    """Failed before review, then the lowest estimated Dice first; cases without a score after those with one."""
    return (row.qc != "fail", row.qc_score is None, row.qc_score if row.qc_score is not None else 0.0)


def write_report(
    path: str, rows: Sequence[CaseRow], failures: Sequence[tuple[str, str]], pictures: Mapping[str, str], title: str
) -> None:
    """`path`: a summary, the plots, the failed and flagged cases with their reasons and pictures, then every case.

    Args:
        rows: the volumes table's rows.
        failures: (case, reason) of the cases that failed.
        pictures: each case's QC picture (PNG), embedded in the page.
        title: the page's title (the bundle's name and version).
    """
    flagged = sorted((r for r in rows if r.qc != "pass"), key=_by_score)
    failed_rows = "".join(
        f'<tr class="failed"><td>{html.escape(case)}</td><td></td><td>failed</td><td></td>'
        f"<td>{html.escape(reason)}</td><td></td><td></td><td></td></tr>"
        for case, reason in failures
    )
    flagged_rows = "".join(_case_row(r, _picture(pictures.get(r.case), lazy=False)) for r in flagged)
    # a flagged case's picture is in the page once, in the table above
    all_rows = "".join(
        _case_row(
            r, '<a href="#review">picture above</a>' if r.qc != "pass" else _picture(pictures.get(r.case), lazy=True)
        )
        for r in sorted(rows, key=_by_score)
    )
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Written {created}.</p>
<p class="summary"><span id="cases">{len(rows) + len(failures)} cases</span><span id="failed">{len(failures)} failed</span>
<span id="flagged">{len(flagged)} flagged for review</span></p>
<div class="plots">{"".join(plots(rows))}</div>
<h2>Failed and flagged</h2>
<table id="review">{HEADER}{failed_rows}{flagged_rows}</table>
<h2>All cases</h2>
<table id="all">{HEADER}{all_rows}</table>
<script>{LAZY_SCRIPT}</script>
</body></html>
"""
    with atomic_write(path, "w") as f:
        f.write(page)
