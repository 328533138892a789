"""What a study shows: every analysis's findings for its results, collected in one list.

Each analysis module (compute, decompose, depth, adaptive) makes its own `Finding`s with
`cartlab.analysis.findings`; this module sits above them and gathers them for the report's
"What this study shows" block (`findings.shows_markdown`).
"""
from __future__ import annotations

import math

from cartlab.analysis import adaptive, compute, decompose, depth
from cartlab.analysis.findings import Finding


def study_findings(res, *, splits=None) -> list[Finding]:
    """Every analysis's findings for the results `res` (a `schema.Results`), per domain."""
    found: list[Finding] = []
    seen = set()
    for make in (compute.findings, decompose.findings, depth.findings, adaptive.findings):
        for f in make(res):  # a study trained to one budget makes its CART-Dense gap a matched-compute one: once
            key = (f.a, f.b, f.split, f.metric, None if math.isnan(f.effect) else round(f.effect, 12))
            if key not in seen:
                seen.add(key)
                found.append(f)
    if splits is not None:
        found = [f for f in found if f.split in set(splits)]
    return found
