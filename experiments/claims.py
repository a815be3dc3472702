"""The paper's claims checked on a run's numbers (``reproduce``'s report): each claim a check with a verdict that
counts a difference only beyond its noise (``Margins``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from experiments.tables import markdown, mean_sd

# Paper numbers quoted beside ours (PAPER.md §4).
PAPER_LENGTH_WORDS = {"original": 10.22, "recaption": 49.43}
PAPER_COVERAGE_PCT = 82.86

HOLDS, NOISE, FAILS, MISSING = "holds", "inconclusive (within noise)", "does not hold", "not measured"


@dataclass
class Claim:
    """A claim of the paper, the check made on this run's numbers, and its verdict."""

    id: str
    paper: str
    check: str
    verdict: str = MISSING
    evidence: str = ""


@dataclass(frozen=True)
class Margins:
    """How large a difference must be to count as a verdict (``claims:`` section of a profile): ``|d| >= z * se``, else
    *inconclusive* whichever way ``d`` points. The sources of ``se`` (seed noise with the prior ``clip_seed_sd``,
    binomial, dit-eval's per-pair se; FID has none, and a large bias at a few hundred images, hence the
    ``fid_rel_margin`` convention): docs/reproduce/README.md, "The claims and their margins"."""

    z: float = 2.0
    clip_seed_sd: float = 1.5
    fid_rel_margin: float = 0.05
    balance_tolerance: float = 2.0
    p_tolerance: float = 0.05
    """A run counts as trained at p when its realised p (``realised_p``) is within this of p."""

    @classmethod
    def from_profile(cls, section: dict[str, Any] | None) -> Margins:
        section = dict(section or {})
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(f"claims: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) for k, v in section.items()})


def verdict(diff: float, se: float | None, z: float) -> str:
    """HOLDS / FAILS when ``diff`` (positive = the claim's direction) is at least ``z * se`` from 0, else NOISE;
    ``se`` None (an exact quantity): the sign decides."""
    if se is None:
        return HOLDS if diff > 0 else FAILS
    if abs(diff) < z * se or diff == 0:
        return NOISE
    return HOLDS if diff > 0 else FAILS


def _margin_text(diff: float, se: float | None, z: float, unit: str = "") -> str:
    return f"difference {diff:+.1f}{unit}" + (f", {z:g} se = {z * se:.1f}{unit}" if se is not None else "")


def _seed_values(by_seed: dict[str, dict], keys: Sequence[str]) -> list[float]:
    """Per seed that measured all ``keys`` (CLIP stage-2 metrics), their mean."""
    return [sum(m[k] for k in keys) / len(keys) for m in by_seed.values() if all(k in m for k in keys)]


def clip_series(results: dict, *keys: str) -> dict[float, list[float]]:
    """p -> ``_seed_values`` of ``keys``."""
    out = {
        float(p): vals for p, by_seed in (results.get("clip") or {}).items() if (vals := _seed_values(by_seed, keys))
    }
    return dict(sorted(out.items()))


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def _cell(v: Sequence[float]) -> str:
    mean, sd = mean_sd(v)
    return f"{mean:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def _series_text(series: dict[float, list[float]], trained: dict[float, float] | None = None) -> str:
    trained = trained or {}
    return ", ".join(
        f"p={p:g}" + (f" (realised {trained[p]:.2f})" if p in trained else "") + f": {_cell(v)}"
        for p, v in series.items()
    )


def trained_p(results: dict, kind: str = "clip") -> dict[float, float]:
    """nominal p -> the p the ``kind`` ("clip" / "dit") runs trained on (``realised_p``, mean over seeds); a row whose
    runs logged none is left out (the claims then use its nominal p and say so)."""
    out = {}
    for p, v in (results.get(f"{kind}_p") or {}).items():
        vals = list(v.values()) if isinstance(v, dict) else [v]
        if vals:
            out[float(p)] = _mean(vals)
    return out


def _row_at(rows: Sequence[float], trained: dict[float, float], target: float, tol: float) -> float | None:
    """The row (nominal p) whose realised p is nearest ``target`` and within ``tol`` of it, else None."""
    near = [p for p in rows if abs(trained.get(p, p) - target) <= tol]
    return min(near, key=lambda p: abs(trained.get(p, p) - target)) if near else None


def _not_trained_at(rows: Sequence[float], trained: dict[float, float], target: float) -> str:
    got = ", ".join(f"p={p:g} realised {trained.get(p, p):.2f}" for p in rows) or "no runs"
    return f"no run trained at p = {target:g} ({got})"


def seed_se(a: Sequence[float], b: Sequence[float], prior_sd: float) -> float:
    """se of mean(a) - mean(b) over seeds: sd = max(prior, pooled sample sd) (conservative with 2-3 seeds)."""
    dof = len(a) + len(b) - 2
    pooled = 0.0
    if dof > 0:
        ss = sum((x - _mean(a)) ** 2 for x in a) + sum((x - _mean(b)) ** 2 for x in b)
        pooled = math.sqrt(ss / dof)
    return max(prior_sd, pooled) * math.sqrt(1 / len(a) + 1 / len(b))


def binomial_se(a: float, n_a: float, b: float, n_b: float) -> float | None:
    """se of a - b for two proportions (in [0, 1]) measured on n_a, n_b items; None when a count is missing."""
    if not n_a or not n_b:
        return None
    return math.sqrt(a * (1 - a) / n_a + b * (1 - b) / n_b)


def _greater(a: Sequence[float], b: Sequence[float], m: Margins) -> tuple[str, str]:
    """Verdict (and its margin text) of mean(a) > mean(b) for CLIP metrics over seeds."""
    diff, se = _mean(a) - _mean(b), seed_se(a, b, m.clip_seed_sd)
    return verdict(diff, se, m.z), _margin_text(diff, se, m.z)


def _dit(results: dict, p: float, key: str) -> float | None:
    return (results.get("dit") or {}).get(str(float(p)), {}).get(key)


def check_claims(results: dict, margins: Margins | None = None, dit_clip: str = "web_clip") -> list[Claim]:
    """Each of the paper's claims as a check over ``results`` (``collect_results``'s layout); a difference smaller
    than its noise (``Margins``) is NOISE ("inconclusive"), never a verdict."""
    m = margins or Margins()
    claims = []

    # §4: recaptions are longer, and their vocabulary covers most of the words of both (whole-population statistics
    # of the recaptioned shards: no sampling noise).
    a = results.get("analysis") or {}
    lw = a.get("length_words") or {}
    words = f"{PAPER_LENGTH_WORDS['recaption']} vs {PAPER_LENGTH_WORDS['original']} words"
    c = Claim(
        "recaptions_longer",
        f"Recaptions are longer than the alt-text (mean {words}, §4, Fig. 3)",
        "mean words per caption: recaption > original",
    )
    o, r = (lw.get("original") or {}).get("mean"), (lw.get("recaption") or {}).get("mean")
    if o is not None and r is not None:
        c.verdict = verdict(r - o, None, m.z)
        c.evidence = f"recaption {r:.1f} vs original {o:.1f} words ({r / o:.1f}x; paper 4.8x)" if o else ""
    claims.append(c)
    # "The recaptions capture 82.86% tokens of the word collections from both": the paper's own mean lengths give
    # exactly this share, 49.43 / (49.43 + 10.22) = 82.87%, so it is the recaptions' share of the word tokens (an
    # earlier reading, distinct-word coverage |V_recap| / |V_recap ∪ V_orig|, matches none of the paper's numbers;
    # analyze still reports it).
    c = Claim(
        "recaption_word_share",
        f"Recaptions carry most of the words of both caption sets ({PAPER_COVERAGE_PCT}% of the word tokens, §4)",
        "recaption word tokens / word tokens of both > 50%",
    )
    voc = a.get("vocabulary") or {}
    share = (voc.get("token_share_pct") or {}).get("recaption")
    if share is not None:
        cov = (voc.get("coverage_pct") or {}).get("recaption")
        c.verdict = verdict(share - 50, None, m.z)
        c.evidence = f"share {share:.1f}% (distinct-word coverage {cov:.1f}%)" if cov is not None else f"{share:.1f}%"
    claims.append(c)

    # Table 1 has no offline metric: the captioner's own attribute scores against chance are the stand-in.
    cap = (results.get("captioner") or {}).get("caption_tune") or {}
    c = Claim(
        "captioner_grounded",
        "The LLaVA-1.5-LLaMA3-8B captioner describes the image (Table 1; stand-in: tiny-world attribute scores)",
        "final captioner's (colour, shape) pair precision > chance",
    )
    if "pair_precision" in cap and "chance_pair_precision" in cap:
        pp, ch, n = cap["pair_precision"], cap["chance_pair_precision"], cap.get("n")
        se = binomial_se(pp / 100, n, ch / 100, n)
        se = None if se is None else 100 * se
        c.verdict = verdict(pp - ch, se, m.z)
        c.evidence = (
            f"pair precision {pp:.1f}% vs chance {ch:.1f}% ({_margin_text(pp - ch, se, m.z, ' pts')}); "
            f"colour precision {cap.get('colour_precision', float('nan')):.1f}% vs chance "
            f"{cap.get('chance_colour_precision', float('nan')):.1f}%"
        )
    claims.append(c)

    # Table 3: CLIP vs p.
    cls = clip_series(results, "classify/top1")
    short = clip_series(results, "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1")
    long = clip_series(results, "long_retrieval/image_to_text_R@1", "long_retrieval/text_to_image_R@1")
    c = Claim(
        "clip_retrieval_intermediate_p",
        "CLIP retrieval is best at an intermediate p (COCO/Flickr R@1 peak at p = 0.4-0.5, both ends worst; Table 3)",
        "mean short-caption R@1 (i2t, t2i): best 0 < p < 1 > both p = 0 and p = 1",
    )
    # Every CLIP claim is checked at the p the runs trained on (their logged train/caption_source/*), not the p they
    # were asked for: a row counts as p = 0 / 0.8 / 1 only within p_tolerance of it.
    tp = trained_p(results, "clip")
    tol = m.p_tolerance
    fallback_note = "" if tp else " (nominal p: the runs logged no realised p)"
    lo, hi = (_row_at(list(short), tp, t, tol) for t in (0.0, 1.0))
    mid = {p: v for p, v in short.items() if tol < tp.get(p, p) < 1 - tol}
    if short and (lo is None or hi is None):
        c.evidence = _not_trained_at(list(short), tp, 0.0 if lo is None else 1.0)
    elif mid:
        best = max(mid, key=lambda p: _mean(mid[p]))
        end = max((lo, hi), key=lambda p: _mean(short[p]))
        c.verdict, margin = _greater(mid[best], short[end], m)
        c.evidence = _series_text(short, tp) + f" (best intermediate p={best:g} vs p={end:g}: {margin})" + fallback_note
    claims.append(c)
    c = Claim(
        "clip_classification_p0",
        "Zero-shot classification drops at p = 0 (ImageNet 36.0 vs 69.7 at p = 1; Table 3)",
        "classification top-1 at p = 0 < at p = 1",
    )
    lo, hi = (_row_at(list(cls), tp, t, tol) for t in (0.0, 1.0))
    if cls and (lo is None or hi is None):
        c.evidence = _not_trained_at(list(cls), tp, 0.0 if lo is None else 1.0)
    elif cls:
        c.verdict, margin = _greater(cls[hi], cls[lo], m)
        c.evidence = f"{_series_text(cls, tp)} ({margin}){fallback_note}"
    claims.append(c)
    c = Claim(
        "clip_balance_p0.8",
        "p = 0.8 keeps classification (-0.5) and improves retrieval (+3.4 on average) over p = 1 (Table 3)",
        f"at p = 0.8: retrieval > p = 1, classification within {m.balance_tolerance:g} points of p = 1",
    )
    both = [p for p in cls if p in short]
    p8, p1 = _row_at(both, tp, 0.8, tol), _row_at(both, tp, 1.0, tol)
    if p8 is not None and p1 is not None:
        retr, margin = _greater(short[p8], short[p1], m)
        drop = _mean(cls[p1]) - _mean(cls[p8])
        # "keeps classification" is the null: it fails only when the drop exceeds the tolerance by more than its
        # noise, and is unsettled (inconclusive) when it exceeds the tolerance by less
        kept = verdict(m.balance_tolerance - drop, seed_se(cls[p1], cls[p8], m.clip_seed_sd), m.z)
        if FAILS in (retr, kept):
            c.verdict = FAILS
        else:
            c.verdict = NOISE if drop > m.balance_tolerance else retr
        at = f" (realised p {tp.get(p8, p8):.2f} vs {tp.get(p1, p1):.2f})" if tp else fallback_note
        c.evidence = (
            f"retrieval {_cell(short[p8])} vs {_cell(short[p1])} ({margin}); classification "
            f"{_cell(cls[p8])} vs {_cell(cls[p1])} ({-drop:+.1f}){at}"
        )
    elif any(0.7 <= p <= 0.9 for p in both):
        c.evidence = _not_trained_at(both, tp, 0.8 if p8 is None else 1.0)
    claims.append(c)
    c = Claim(
        "clip_long_retrieval",
        "Recaptions make long-caption retrieval far better (Urban-1K +31.8 / +36.4 R@1; Table 6)",
        "mean long-caption R@1 (i2t, t2i) at the largest p < 1 > at p = 1",
    )
    hi = _row_at(list(long), tp, 1.0, tol)
    below = [p for p in long if tp.get(p, p) < 1 - tol]
    if long and hi is None:
        c.evidence = _not_trained_at(list(long), tp, 1.0)
    elif below:
        p = max(below, key=lambda q: tp.get(q, q))
        c.verdict, margin = _greater(long[p], long[hi], m)
        c.evidence = f"{_series_text(long, tp)} ({margin}){fallback_note}"
    claims.append(c)

    # Table 7: DiT at p = 0 vs p = 1.
    def dit_claim(cid: str, paper: str, check: str, key: str, kind: str, lower_better=False, winner=0.0, scale=1.0):
        """Holds when the p named ``winner`` has the better value of ``key`` by more than its noise (``kind``)."""
        c = Claim(cid, paper, check)
        v0, v1 = _dit(results, 0.0, key), _dit(results, 1.0, key)
        off = [p for p in (0.0, 1.0) if abs(dit_p.get(p, p) - p) > tol]
        if v0 is not None and v1 is not None and off:
            c.evidence = _not_trained_at([0.0, 1.0], dit_p, off[0])
        elif v0 is not None and v1 is not None:
            win, lose = (v0, v1) if winner == 0.0 else (v1, v0)
            diff = (lose - win) if lower_better else (win - lose)
            if kind == "fid":
                se = m.fid_rel_margin * max(abs(v0), abs(v1)) / m.z  # the convention: |d| >= fid_rel_margin * FID
            elif kind == "accuracy":
                n0, n1 = (_dit(results, p, key.rsplit("/", 1)[0] + "/n") for p in (0.0, 1.0))
                se = binomial_se(v0, n0, v1, n1)
            else:  # clip score: the per-pair standard errors of dit-eval
                s0, s1 = _dit(results, 0.0, key + "/se"), _dit(results, 1.0, key + "/se")
                se = math.hypot(s0, s1) if s0 is not None and s1 is not None else None
            se = None if se is None else se * scale
            c.verdict = verdict(diff * scale, se, m.z)
            at = [f" (realised {dit_p[p]:.2f})" if p in dit_p else "" for p in (0.0, 1.0)]
            c.evidence = (
                f"p=0{at[0]}: {v0 * scale:.1f}, p=1{at[1]}: {v1 * scale:.1f} "
                f"({_margin_text(diff * scale, se, m.z)})" + ("" if dit_p else " (nominal p)")
            )
        claims.append(c)

    dit_p = trained_p(results, "dit")
    dit_claim(
        "dit_recap_clip_score",
        "DiT follows detailed prompts better at p = 0 (Recap-prompt CLIP score 32.5 vs 29.3; Table 7)",
        f"CLIP score ({dit_clip}) on recaption prompts: p = 0 > p = 1",
        *(f"recaption/clip_score/{dit_clip}", "clip_score"),
    )
    dit_claim(
        "dit_recap_fid",
        "DiT images match detailed prompts' images better at p = 0 (Recap FID 27.8 vs 36.2; Table 7)",
        "FID on recaption prompts: p = 0 < p = 1",
        *("recaption/fid", "fid", True),
    )
    dit_claim(
        "dit_raw_fid",
        "On raw (short) prompts p = 1 keeps the better FID (32.5 vs 37.6; Table 7)",
        "FID on short-caption prompts: p = 1 < p = 0",
        *("caption/fid", "fid", True, 1.0),
    )
    dit_claim(
        "dit_recap_judge",
        "A judge rates p = 0 images as matching detailed prompts better (GPT-4V 2.53 vs 1.40; Table 7; stand-in: "
        "the pinned attribute judge)",
        "judge's colour accuracy on recaption prompts: p = 0 > p = 1",
        *("recaption/attributes/colour", "accuracy", False, 0.0, 100),
    )
    return claims


def _n(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def claims_markdown(claims: Sequence[Claim], seeds: int, margins: Margins | None = None) -> str:
    m = margins or Margins()
    count = {v: sum(c.verdict == v for c in claims) for v in (HOLDS, NOISE, FAILS, MISSING)}
    measured = len(claims) - count[MISSING]
    lines = [
        f"Of {measured} measured claims, **{_n(count[HOLDS], 'holds', 'hold')}, "
        f"{_n(count[FAILS], 'does not hold', 'do not hold')} and {_n(count[NOISE], 'is', 'are')} inconclusive** "
        "(the difference is within its noise)"
        + (f"; {count[MISSING]} not measured" if count[MISSING] else "")
        + ". Each verdict is computed from the numbers below (`experiments/claims.py`), and a "
        f"difference counts only when it is at least {m.z:g} standard errors: CLIP metrics against seed noise "
        f"(sd = max({m.clip_seed_sd:g} points, the pooled sd of {seeds} seed(s) per row), accuracies against binomial "
        f"noise, CLIP scores against their per-pair standard errors; FID differences count above "
        f"{m.fid_rel_margin:.0%} of the larger FID (a convention: FID has no closed-form standard error).",
        "",
        markdown(
            [(c.paper, c.check, f"**{c.verdict}**", c.evidence or "-") for c in claims],
            ["claim (paper)", "check on this run", "verdict", "numbers"],
        ),
    ]
    return "\n".join(lines)


# Table 8 ("beyond the paper"): each row against the paper's p = 0.8, on the tiny world's three kinds of task.
TABLE8_TASKS = {
    "short retrieval": ("retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1"),
    "long retrieval": ("long_retrieval/image_to_text_R@1", "long_retrieval/text_to_image_R@1"),
    "classification": ("classify/top1",),
}


def check_table8(
    results: dict, margins: Margins | None = None, baseline: str = "p0.8", rows: Sequence[str] | None = None
) -> list[Claim]:
    """Per Table 8 row (``rows``, default: those in the results) and task (``TABLE8_TASKS``), the claim "the row beats
    ``baseline``" over ``results["table8"]`` (row id -> seed -> stage-2 metrics), against seed noise."""
    m = margins or Margins()
    by_row = results.get("table8") or {}
    claims = []
    for row in (r for r in (by_row if rows is None else rows) if r != baseline):
        for task, keys in TABLE8_TASKS.items():
            c = Claim(
                f"table8_{row}_{task.replace(' ', '_')}",
                f"{row} beats the paper's {baseline} on {task} (Table 8)",
                f"mean {' / '.join(keys)}: {row} > {baseline}",
            )
            ours, base = (_seed_values(by_row.get(r) or {}, keys) for r in (row, baseline))
            if ours and base:
                c.verdict, margin = _greater(ours, base, m)
                c.evidence = f"{row} {_cell(ours)} vs {baseline} {_cell(base)} ({margin})"
            claims.append(c)
    return claims
