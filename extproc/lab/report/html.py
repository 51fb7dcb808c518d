"""The report as one self-contained HTML page (tables inline, the PNG charts beside it)."""

from __future__ import annotations

from html import escape
from typing import Sequence

from extproc.lab.report.tables import TABLES, comparison_lines, rows

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; margin: 0.5em 0 1.5em; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1em; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def _table(title: str, header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<h2>{escape(title)}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>\n"


def render(runs: Sequence[dict], comparison: dict, charts: Sequence[str], meta: dict) -> str:
    """The page: what was run, the comparison sentences, the tables, the charts."""
    about = ", ".join(f"{escape(str(k))}: <code>{escape(str(v))}</code>" for k, v in meta.items() if v is not None)
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>llm-extproc growth lab</title>"
             f"<style>{_STYLE}</style></head><body>\n<h1>Cost under growth</h1>\n<p>{about}</p>\n"]
    findings = comparison_lines(comparison)
    if findings:
        parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in findings) + "</ul>\n")
    for title, columns in TABLES.items():
        parts.append(_table(title, *rows(runs, columns)))
    parts.append("<div class='charts'>" + "".join(f"<img src='{escape(c)}' alt='{escape(c)}'>" for c in charts)
                 + "</div>\n")
    parts.append("<p>Definitions: <code>extproc/lab/report/compute.py</code>; the numbers are in "
                 "<code>report.json</code>.</p>\n</body></html>\n")
    return "".join(parts)
