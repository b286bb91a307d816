"""One self-contained HTML report: tables, figures embedded as base64 PNG, the missing / failed
list, the selection rule, and the command and kdexp version that made it. No external resources,
so it opens offline and can be mailed or archived as a single file."""
from __future__ import annotations

import base64
import datetime as dt
import html
from collections import Counter
from pathlib import Path

from . import numerics, output
from .figures import Figure
from .pipeline import Analysis
from .render import html_table
from .tables import Table

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1280px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.6em; font-size: 1.1em; }
table { border-collapse: collapse; font-size: .85em; margin: .4em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; white-space: nowrap; }
th { border-bottom: 2px solid #444; background: #f6f6f6; }
td.long { white-space: normal; overflow-wrap: anywhere; min-width: 24em; }
div.scroll { overflow-x: auto; }
tbody tr:nth-child(even) { background: #fafafa; }
p.note { font-size: .8em; color: #555; margin: .2em 0; max-width: 80em; }
.meta td { border: none; padding: .1em .8em .1em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #444; }
.rule { background: #fff8e0; border-left: 4px solid #e0b000; padding: .5em 1em; }
.bad { color: #a00; font-weight: bold; } .ok { color: #070; font-weight: bold; }
"""


def render_report(analysis: Analysis, figures: dict[str, list[Figure]], command: str, version: str) -> str:
    esc = html.escape
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    n_used = int((analysis.frame["status"] == "completed").sum())
    state = ('<span class="ok">every expected cell has a completed run</span>' if analysis.complete else
             f'<span class="bad">{esc(analysis.incomplete_text())}</span>')
    parts = ["<h1>kdexp analysis report</h1>",
             '<table class="meta">',
             f"<tr><td>Command</td><td><code>{esc(command)}</code></td></tr>",
             f"<tr><td>kdexp version</td><td>{esc(version)}</td></tr>",
             f"<tr><td>Generated</td><td>{esc(when)}</td></tr>",
             f"<tr><td>Runs</td><td>{len(analysis.frame)} found, {n_used} completed; {state}</td></tr>",
             f"<tr><td>Canaries</td><td>{_canaries_text(analysis)}</td></tr>",
             "</table>", _toc(analysis)]
    for exp in analysis.experiments:
        parts.append(f'<h2 id="exp-{esc(exp.name)}">Experiment: {esc(exp.name)}</h2>')
        parts.append(f'<p class="rule">{esc(exp.rule_note)}</p>')
        if text := numerics.note(r for c in exp.cells for r in c.runs):
            parts.append(f'<p class="rule">{esc(text)}</p>')
        parts += [html_table(t) for t in analysis.tables[exp.name]]
        for fig in figures.get(exp.name, []):
            parts.append(_figure(fig))
    if analysis.shared:
        parts.append('<h2 id="across">Across experiments</h2>')
        parts += [html_table(t) for t in analysis.shared]
    if analysis.provenance:
        parts.append('<h2 id="provenance">Provenance</h2>')
        parts += [html_table(t) for t in analysis.provenance]
    parts.append('<h2 id="problems">Missing / failed / skipped</h2>')
    parts.append(_table_or_none(analysis.problems, "No run was skipped."))
    parts.append(_table_or_none(analysis.cells_table(), "No expected cell is missing."))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>kdexp report</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(path: Path, analysis: Analysis, figures: dict[str, list[Figure]], command: str,
                 version: str) -> Path:
    output.write_text(path, render_report(analysis, figures, command, version))
    return path


def _figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    title = html.escape(fig.title)
    return (f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
            f"<figcaption>{title} (PDF: {html.escape(fig.pdf.name)})</figcaption></figure>")


def _table_or_none(table: Table, empty: str) -> str:
    return html_table(table) if table.rows else f"<h3>{html.escape(table.title)}</h3><p>{empty}</p>"


def _toc(analysis: Analysis) -> str:
    items = [f'<li><a href="#exp-{html.escape(e.name)}">Experiment {html.escape(e.name)}</a> '
             f"(rule: {html.escape(e.rule.label)})</li>" for e in analysis.experiments]
    if analysis.shared:
        items.append('<li><a href="#across">Across experiments</a></li>')
    if analysis.provenance:
        items.append('<li><a href="#provenance">Provenance</a> (canaries, the runs\' code and environment)</li>')
    items.append(f'<li><a href="#problems">Missing / failed / skipped</a> ({len(analysis.problems.rows)} runs, '
                 f"{len(analysis.cells)} cells)</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _canaries_text(analysis: Analysis) -> str:
    """`2: 1 passed, 1 FAILED (see Provenance)`, or that none was found."""
    if not analysis.canaries:
        return ("none found under the roots (launch.study's GPU check writes "
                "&lt;experiment&gt;/canary/&lt;job id&gt;/check.json)")
    counts = Counter(c.verdict.split(":")[0] for c in analysis.canaries)
    text = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    bad = "" if set(counts) == {"passed"} else ' class="bad"'
    return f'<span{bad}>{len(analysis.canaries)}: {html.escape(text)}</span> (<a href="#provenance">Provenance</a>)'
