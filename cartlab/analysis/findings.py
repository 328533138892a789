"""Findings: what a study shows, each claim stated with its seed noise, per domain.

Every analysis that compares variants returns a list of `Finding`s (decompose: the CART-Dense gap
and the ablations; compute: the matched-compute comparison; depth: whether loops past the trained
R help). A finding names what is compared (`a` against `b`), on which validation domain (`split`)
and metric, the effect `mean(a) - mean(b)` with its 95% seed-noise interval, the seeds on each
side, and a verdict:

    signal            both sides have >= 2 seeds and the interval excludes 0
    within noise      both sides have >= 2 seeds and the interval contains 0
    not enough seeds  a side has one seed: the effect is shown, never stated as a result
    not measured      a side has no value on this domain (or the read was refused)

The interval is Welch's t interval of the difference of two seed means (unequal variances; with
two seeds a side it is wide, as it should be). Where one side has a single seed the interval uses
the other side's seed sd as the noise of both (the study's band) and the verdict stays "not
enough seeds". A paired finding (`paired`: per-seed differences within one variant, e.g. the
loss at 2R minus the loss at R) uses the one-sample t interval of the differences.

`cartlab.analysis.study.study_findings` collects every analysis's findings for a study (each
analysis module imports this one, so the collector lives above them); `shows_markdown` writes them as
the "What this study shows" block at the top of a report and of summary.md: one line per claim,
every domain on it, the headline domain named with the reason it is the headline.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
from scipy import stats as sps

VERDICTS = ("signal", "within noise", "not enough seeds", "not measured")
LEVEL = 0.95


@dataclass(frozen=True)
class Finding:
    analysis: str
    """Which analysis made it: gap, ablation, matched_compute, depth, ..."""
    claim: str
    """What is compared, in words: "CART vs stored-matched Dense"."""
    a: str
    """The variant (label) whose effect is measured."""
    b: str
    """The reference it is measured against ("" for a paired finding within `a`)."""
    split: str
    """The validation domain."""
    metric: str
    """loss (nats) or ppl; lower is better, so a negative effect favours `a`."""
    effect: float
    """mean(a) - mean(b) over seeds (paired: mean of the per-seed differences)."""
    low: float
    """Lower end of the 95% seed-noise interval of `effect` (NaN when it cannot be estimated)."""
    high: float
    n_a: int
    """Seeds behind `a`."""
    n_b: int
    """Seeds behind `b` (0 for a paired finding)."""
    verdict: str
    """signal | within noise | not enough seeds | not measured"""
    note: str = ""
    """A qualifier the reader must see, e.g. "mid-schedule read" or why it is not measured."""

    def interval(self) -> str:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "no interval"
        return f"95% CI [{self.low:+.3f}, {self.high:+.3f}]"

    def seeds(self) -> str:
        return f"{self.n_a} seed{'s' * (self.n_a != 1)}" + ("" if not self.b else f" vs {self.n_b}")

    def phrase(self) -> str:
        """`prose -0.051 nats (95% CI [-0.080, -0.022], 2 seeds vs 2): signal`."""
        if self.verdict == "not measured":
            return f"{self.split}: not measured" + (f" ({self.note})" if self.note else "")
        unit = " nats" if self.metric == "loss" else ""
        note = f"; {self.note}" if self.note else ""
        return (f"{self.split} {self.effect:+.3f}{unit} ({self.interval()}, {self.seeds()}{note}): "
                f"**{self.verdict}**")


def _clean(values) -> np.ndarray:
    v = np.asarray(list(values), dtype=float)
    return v[np.isfinite(v)]


def compare(a, b) -> tuple[float, float, float, str]:
    """(effect, low, high, verdict) of mean(a) - mean(b) over the seeds in `a` and `b`."""
    a, b = _clean(a), _clean(b)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan, "not measured"
    effect = float(a.mean() - b.mean())
    if len(a) < 2 and len(b) < 2:
        return effect, math.nan, math.nan, "not enough seeds"
    if len(a) < 2 or len(b) < 2:  # the seeded side's sd stands for both sides' noise
        sd = float((a if len(a) > 1 else b).std(ddof=1))
        dof = max(len(a), len(b)) - 1
        se = sd * math.sqrt(1 / len(a) + 1 / len(b))
        half = float(sps.t.ppf(0.5 + LEVEL / 2, dof)) * se
        return effect, effect - half, effect + half, "not enough seeds"
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return effect, effect, effect, "signal" if effect != 0 else "within noise"
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = float(sps.t.ppf(0.5 + LEVEL / 2, dof)) * se
    low, high = effect - half, effect + half
    return effect, low, high, "signal" if (low > 0 or high < 0) else "within noise"


def paired(differences) -> tuple[float, float, float, str]:
    """(effect, low, high, verdict) of the mean of per-seed differences (one-sample t interval)."""
    d = _clean(differences)
    if not len(d):
        return math.nan, math.nan, math.nan, "not measured"
    effect = float(d.mean())
    if len(d) < 2:
        return effect, math.nan, math.nan, "not enough seeds"
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0:
        return effect, effect, effect, "signal" if effect != 0 else "within noise"
    half = float(sps.t.ppf(0.5 + LEVEL / 2, len(d) - 1)) * se
    low, high = effect - half, effect + half
    return effect, low, high, "signal" if (low > 0 or high < 0) else "within noise"


def finding(analysis: str, claim: str, a: str, b: str, split: str, metric: str, a_values, b_values,
            note: str = "") -> Finding:
    """The Finding of `a_values` (seeds of `a`) against `b_values` (seeds of `b`)."""
    effect, low, high, verdict = compare(a_values, b_values)
    return Finding(analysis, claim, a, b, split, metric, effect, low, high, len(_clean(a_values)),
                   len(_clean(b_values)), verdict, note)


def paired_finding(analysis: str, claim: str, a: str, split: str, metric: str, differences,
                   note: str = "") -> Finding:
    effect, low, high, verdict = paired(differences)
    return Finding(analysis, claim, a, "", split, metric, effect, low, high, len(_clean(differences)), 0,
                   verdict, note)


def not_measured(analysis: str, claim: str, a: str, b: str, split: str, metric: str, why: str) -> Finding:
    return Finding(analysis, claim, a, b, split, metric, math.nan, math.nan, math.nan, 0, 0, "not measured", why)


COLUMNS = tuple(f.name for f in fields(Finding))


def to_frame(found: list[Finding]) -> pd.DataFrame:
    return pd.DataFrame([asdict(f) for f in found], columns=list(COLUMNS))


def from_frame(frame: pd.DataFrame) -> list[Finding]:
    out = []
    for row in frame.to_dict("records"):
        row = {k: row[k] for k in COLUMNS}
        for k in ("n_a", "n_b"):
            row[k] = int(row[k])
        for k in ("effect", "low", "high"):
            row[k] = math.nan if row[k] is None else float(row[k])
        row["note"] = row["note"] or ""
        out.append(Finding(**row))
    return out


HEADLINE_REASONS = {
    "wiki": "the paper's headline split (Wikipedia)",
    "prose": "the embedded corpus's stand-in for the paper's Wikipedia split",
}


def headline_split(splits) -> tuple[str, str]:
    """(domain, why) the headline is read on: wiki, else prose, else the first domain."""
    splits = sorted(set(splits))
    for s in ("wiki", "prose"):
        if s in splits:
            return s, HEADLINE_REASONS[s]
    return (splits[0], "the first validation domain (no wiki or prose split)") if splits else ("", "")


def _summary(group: list[Finding]) -> str:
    """How a claim fares across its domains: "signal on 2 of 3 domains (a better on prose, ...)"."""
    measured = [f for f in group if f.verdict != "not measured"]
    signal = [f for f in measured if f.verdict == "signal"]
    if not measured:
        return "not measured on any domain"
    if all(f.verdict == "not enough seeds" for f in measured):
        return "not enough seeds to state a result on any domain"
    if not signal:
        return f"within noise on every domain measured ({len(measured)})"
    better = [f.split for f in signal if f.effect < 0]
    worse = [f.split for f in signal if f.effect > 0]
    parts = ([f"lower (better) on {', '.join(better)}"] if better else []) + \
            ([f"higher (worse) on {', '.join(worse)}"] if worse else [])
    unmeasured = len(group) - len(measured)
    return (f"a signal on {len(signal)} of {len(measured)} domains measured"
            + (f" ({unmeasured} not measured)" if unmeasured else "") + f": {'; '.join(parts)}")


def shows_markdown(found: list[Finding], *, completeness: str = "") -> str:
    """The "What this study shows" block: the completeness line, then per claim one bullet with
    its verdict across domains and each domain's effect, interval, seeds and verdict."""
    lines = ["## What this study shows", ""]
    if completeness:
        lines += [completeness, ""]
    if not found:
        return "\n".join(lines + ["No comparison of this study could be made from its runs (see the sections "
                                  "below for what each needs).", ""])
    head, why = headline_split(f.split for f in found if f.verdict != "not measured" or f.split)
    metrics = sorted({f.metric for f in found})
    lines += [f"Effects are `{' / '.join(metrics)}` of the first model minus the second (negative: the first is "
              f"better), with their 95% seed-noise interval. A claim on one seed is never a result. Headline "
              f"domain: **{head}**, {why}; every domain is listed, and a claim holds only where its verdict says "
              f"so.", ""]
    order: dict[tuple, list[Finding]] = {}
    for f in found:
        order.setdefault((f.analysis, f.claim, f.a, f.b, f.metric), []).append(f)
    for (_, claim, _, _, _), group in order.items():
        group = sorted(group, key=lambda f: (f.split != head, f.split))
        lines.append(f"- **{claim}**: {_summary(group)}. " + "; ".join(f.phrase() for f in group) + ".")
    return "\n".join(lines + [""])
