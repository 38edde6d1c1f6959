"""`pipeline bench NAME`: measurements printed as ratio tables, side by side in one run.

Every table is a list of rows {"name", "value", "unit", "baseline", "ratio"} (`--json FILE` writes
them); `baseline` is what the value is compared with in the same run, `ratio` = value / baseline.
"""

from __future__ import annotations

import statistics
from typing import Any


def row(name: str, value: float, unit: str, baseline: float | None = None) -> dict[str, Any]:
    ratio = value / baseline if baseline else None
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(title: str, rows: list[dict[str, Any]]) -> str:
    def number(x: float | None) -> str:
        if x is None:
            return ""
        return f"{x:,.4f}" if abs(x) < 1 else f"{x:,.3f}" if abs(x) < 100 else f"{x:,.0f}"

    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [title, f"{'measure':{width}}  {'value':>10}  {'unit':8}  {'baseline':>10}  {'ratio':>6}"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        value, baseline = number(r["value"]), number(r["baseline"])
        lines.append(f"{r['name']:{width}}  {value:>10}  {r['unit']:8}  {baseline:>10}  {ratio:>6}")
    return "\n".join(lines)
