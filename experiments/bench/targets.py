"""S2FT's efficiency targets in a benchmark's results: one record shape and the one line the tables print.

A record is ``{"what", "ratio", "op", "limit", "met"}``: S2FT's measured ``ratio`` (a time, memory or throughput
ratio) must be at most (``op`` ``"<="``) or at least (``">="``) ``limit``. Each benchmark computes its records where
it defines its targets (`training`, `switch`, `serving`); the tables print them with `targets_line`.
"""

import operator

COMPARISONS = {"<=": (operator.le, "≤"), ">=": (operator.ge, "≥")}


def target(what: str, ratio: float, op: str, limit: float) -> dict:
    """The record of one target.

    Args:
        what: what the ratio measures, as the table names it.
        ratio: S2FT's measured ratio.
        op: ``"<="`` (the ratio must be at most ``limit``) or ``">="`` (at least).
        limit: the target's bound.
    """
    if op not in COMPARISONS:
        raise ValueError(f"a target's op is one of {', '.join(COMPARISONS)}, got {op!r}")
    return {"what": what, "ratio": ratio, "op": op, "limit": limit, "met": COMPARISONS[op][0](ratio, limit)}


def targets_line(targets: list[dict]) -> str:
    """The tables' line of target records (empty when there are none), e.g. ``S2FT targets: step time / full:
    0.65× (≤ 0.55×) MISSED; ...``."""
    if not targets:
        return ""
    checks = [
        f"{t['what']}: {t['ratio']:.2f}× ({COMPARISONS[t['op']][1]} {t['limit']:g}×) {'met' if t['met'] else 'MISSED'}"
        for t in targets
    ]
    return "\nS2FT targets: " + "; ".join(checks) + ".\n"
