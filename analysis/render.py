"""Tables → Markdown (terminal too), LaTeX booktabs, CSV and HTML fragments."""
from __future__ import annotations

import csv
import html
import io
import re

from tabulate import tabulate

from .tables import Table


def markdown(table: Table) -> str:
    body = tabulate(table.rows, headers=table.columns, tablefmt="github", disable_numparse=True)
    notes = "".join(f"\n_{n}_\n" for n in table.notes)
    return f"### {table.title}\n\n{body}\n{notes}"


def terminal(table: Table) -> str:
    body = tabulate(table.rows, headers=table.columns, tablefmt="simple", disable_numparse=True)
    notes = "".join(f"  {n}\n" for n in table.notes)
    return f"{table.title}\n{body}\n{notes}"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                  "±": r"$\pm$", "→": r"$\to$", "Δ": r"$\Delta$", "α": r"$\alpha$", "β": r"$\beta$",
                  "−": r"$-$", "×": r"$\times$", "≥": r"$\geq$", "‖": r"$\|$", "†": r"$^\dagger$", "–": "--",
                  "·": r"$\cdot$", "÷": r"$\div$"}
# A method's grid symbols may be any Greek letter (DIST's γ, ...): each in math mode, as α and β above.
_GREEK = dict(zip("γδεζηθικλμνξπρστυφχψω", "gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho "
                                            "sigma tau upsilon phi chi psi omega".split()))
_LATEX_SPECIAL.update({letter: f"$\\{name}$" for letter, name in _GREEK.items()})
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], text)


def latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); notes as a comment and a footnote line."""
    spec = "l" * len(table.columns)
    lines = [f"% {latex_escape(table.title)}", r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [r"\par\footnotesize " + latex_escape(n) for n in table.notes]
    return "\n".join(lines) + "\n"


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buf.getvalue()


def html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    # Long cells (paths, reasons) may wrap; numbers never do.
    body = "".join("<tr>" + "".join(f'<td class="long">{esc(v)}</td>' if len(v) > 50 else f"<td>{esc(v)}</td>"
                                    for v in row) + "</tr>" for row in table.rows)
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in table.notes)
    return (f'<h3 id="{esc(table.name)}">{esc(table.title)}</h3>\n<div class="scroll"><table><thead><tr>{head}'
            f"</tr></thead><tbody>{body}</tbody></table></div>\n{notes}\n")
