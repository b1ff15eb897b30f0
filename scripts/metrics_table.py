"""Print the README's metrics table (Markdown) from cluster.metrics.METRICS, the single source of truth.

    .venv/bin/python scripts/metrics_table.py

Paste the output under "## Metrics" in README.md whenever METRICS changes;
tests/integration/test_deploy.py fails while the two disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apexq.cluster.metrics import METRICS  # noqa: E402


def table() -> str:
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for name, (typ, help_, labels) in METRICS.items():
        label_text = ", ".join(f"`{label}`" for label in labels) or "none"
        meaning = help_.replace("|", r"\|")  # a literal | inside a Markdown table cell
        rows.append(f"| `{name}` | {typ} | {label_text} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
