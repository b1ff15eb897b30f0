"""Helpers for the monitoring tests (dashboard and alert rules): small PromQL scanners and promtool.

The scanners are deliberately simple (parentheses matched by counting, no full PromQL parser):
enough for the expressions apexq ships, and tested on the wrong forms they must catch.
"""

import os
import re
import shutil

import pytest

AGGREGATIONS = (
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count_values",
    "count",
    "bottomk",
    "topk",
    "quantile",
)
RANGE_FUNCTIONS = ("rate", "irate", "increase")
AGGREGATION = re.compile(r"\b(%s)\s*(?:(by|without)\s*\(([^)]*)\)\s*)?\(" % "|".join(AGGREGATIONS))
RANGE_CALL = re.compile(r"\b(%s)\s*\(" % "|".join(RANGE_FUNCTIONS))
FIXED_WINDOW = re.compile(r"\[\s*\d+(?:ms|[smhdwy])")


def closing(expr: str, i: int) -> int:
    """Index of the parenthesis that closes the one at ``expr[i]``."""
    depth = 0
    for j in range(i, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[j], 0)
        if depth == 0:
            return j
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def aggregations(expr: str) -> list:
    """(operator, 'by' | 'without' | None, labels) for every aggregation in ``expr``; the grouping
    clause may come before or after the argument (``sum by (run) (x)`` or ``sum(x) by (run)``)."""
    out = []
    for m in AGGREGATION.finditer(expr):
        op, kw, labels = m.groups()
        if kw is None:
            after = re.match(r"\s*(by|without)\s*\(([^)]*)\)", expr[closing(expr, m.end() - 1) + 1 :])
            if after:
                kw, labels = after.groups()
        out.append((op, kw, {x.strip() for x in (labels or "").split(",") if x.strip()}))
    return out


def aggregations_dropping(expr: str, label: str) -> list:
    """Aggregations in ``expr`` whose result loses ``label`` (no `by` naming it, or `without` it)."""
    return [
        (op, kw, labels)
        for op, kw, labels in aggregations(expr)
        if not ((kw == "by" and label in labels) or (kw == "without" and label not in labels))
    ]


def range_windows(expr: str) -> list:
    """The range of every rate/irate/increase call, e.g. ['$__rate_interval', '30s']."""
    out = []
    for m in RANGE_CALL.finditer(expr):
        arg = expr[m.end() : closing(expr, m.end() - 1)]
        ranges = re.findall(r"\[([^\]]*)\]", arg)
        out.append(ranges[-1].strip() if ranges else None)
    return out


def metric_names(expr: str) -> set:
    """apexq_ metric names and `up` in an expression (label values in quotes excluded)."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\bapexq_[A-Za-z0-9_:]+", bare)) | ({"up"} if re.search(r"\bup\s*\{", bare) else set())


def promtool() -> str:
    """Path of promtool. Without it the test is skipped on a workstation but fails in CI (CI=true,
    which .ci/run sets), so a CI image that lost promtool cannot pass with the checks skipped."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool not installed but CI is set: .ci/run installs it (apt-get install prometheus)")
        pytest.skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus)")
    return path
