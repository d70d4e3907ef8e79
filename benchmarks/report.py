"""The table every benchmark prints: each figure next to its budget and whether the
budget is met, so that a run reads at a glance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Budget:
    """A bound a figure must respect: `op` is ">=" or "<=", `source` names the issue."""

    op: str
    limit: float
    source: str

    def met(self, value: float) -> bool:
        return value >= self.limit if self.op == ">=" else value <= self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g} ({self.source})"


@dataclass(frozen=True)
class Row:
    """One figure of the table. `value` None: not measured, and `text` says why;
    otherwise `text`, if given, is shown instead of the value formatted with `fmt`."""

    name: str
    value: Optional[float]
    fmt: str = ".3g"
    budget: Optional[Budget] = None
    text: Optional[str] = None

    def shown(self) -> str:
        if self.text is not None:
            return self.text
        return "n/a" if self.value is None else format(self.value, self.fmt)

    def verdict(self) -> str:
        if self.budget is None:
            return ""
        if self.value is None:
            return "?"
        return "yes" if self.budget.met(self.value) else "NO"


def print_table(title: str, rows: Sequence[Row]) -> None:
    """A Markdown table (metric, value, budget, met), then which budgets are not met."""
    cells = [("metric", "value", "budget", "met")]
    cells += [(row.name, row.shown(), str(row.budget or ""), row.verdict()) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    print(f"\n{title}")
    for i, line in enumerate(cells):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    judged = [row for row in rows if row.budget is not None]
    missed = [row.name for row in judged if row.verdict() != "yes"]
    print(f"\nbudgets met: {len(judged) - len(missed)} of {len(judged)}"
          + (f"; not met or not measured: {'; '.join(missed)}" if missed else ""))
