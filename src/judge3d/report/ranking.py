"""Arena-Hard-style Bradley–Terry ranking of the base and every arm, from the evaluation judge's
verdicts (definitions: docs/protocol.md#ranking-bradleyterry).

- One fit per regime: an arm in regime r was judged against the base on inputs of regime r, so the
  players of regime r are ``base`` (the base on those inputs) and the arms of that regime.
- P(a beats b) = σ(θ_a − θ_b), anchored at θ_base = 0; the Elo-like rating is
  ``1000 + 400·log10(e)·θ`` (Arena-Hard's scale: the base sits at 1000, +400 is 10:1 odds).
- A swap-inconsistent pair (a flip) is a tie: half a win to each side (Arena-Hard's convention).
- The comparisons form a star graph (every arm meets only the base), so the likelihood separates into
  one term per arm: the joint maximum-likelihood fit is each arm's own fit against the base, and the
  BT order equals the tie-adjusted win-rate order. What the fit adds is the scale, the predicted win
  probability and, through the bootstrap, the intervals and the rank intervals.
- A small L2 ridge (``RIDGE``/2 · θ²) keeps an arm that wins or loses every pair finite.
- Intervals: percentile bootstrap over objects, one resample (``report.seed``, ``report.n_boot``)
  shared by every player of a regime, so the rank intervals compare players on the same draws.

Pure functions over the pair records of :func:`judge3d.report.build.arm_pair_records` and the arm
metrics (which say which arms diverged and which objects were set aside as flagged), so ``verify``
recomputes ``metrics/ranking.json`` from the raw logs with the same code.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from judge3d.core import stats
from judge3d.report.arm_metrics import ReportSettings
from judge3d.report.tables import Table, _banner, fmt, fmt_ci, frame
from judge3d.world.degrade import REGIMES

BASE = "base"
# L2 penalty on each arm's natural-log strength. Tiny next to the likelihood's curvature (n/4 = 8
# at θ = 0 for 32 pairs): a tie-adjusted record of 24 of 32 moves from θ = ln 3 by ~0.2 %, while a
# perfect 32 of 32 lands near θ ≈ 6.2 (win probability 0.998) instead of +∞.
RIDGE = 0.01
ELO_BASE = 1000.0
ELO_PER_THETA = 400.0 / math.log(10.0)   # Elo points per unit of natural log-odds
ALPHA = 0.05
_BRENT_XTOL = 1e-12


# --------------------------------------------------------------------------------------------
# the fit
# --------------------------------------------------------------------------------------------
def fit_strength(wins: float, losses: float, ridge: float = RIDGE) -> float:
    """Maximum-likelihood θ of a player against the anchor (θ = 0): P(win) = σ(θ), with ``wins`` and
    ``losses`` as weights (a tie is half of each) and an L2 penalty ``ridge``/2 · θ².

    The penalized log-likelihood is strictly concave, so θ is the one root of its score
    ``wins·σ(−θ) − losses·σ(θ) − ridge·θ``, found by ``scipy.optimize.brentq``. With ``ridge = 0``
    the root is ``ln(wins / losses)``; a record with no losses (or no wins) then has no finite
    maximum and returns ``+inf`` (``-inf``) explicitly. No battles at all: ``nan``.
    """
    wins, losses, ridge = float(wins), float(losses), float(ridge)
    if not (math.isfinite(wins) and math.isfinite(losses) and wins >= 0 and losses >= 0):
        raise ValueError(f"fit_strength: wins and losses must be finite and >= 0, got {wins}, {losses}.")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"fit_strength: ridge must be finite and >= 0, got {ridge}.")
    if wins + losses == 0:
        return math.nan
    if ridge == 0 and (wins == 0 or losses == 0):
        return math.inf if losses == 0 else -math.inf

    def score(theta: float) -> float:
        return wins * expit(-theta) - losses * expit(theta) - ridge * theta

    at_zero = score(0.0)
    if at_zero == 0.0:
        return 0.0
    sign = 1.0 if at_zero > 0 else -1.0
    edge = 1.0
    while sign * score(sign * edge) > 0:  # the score falls through 0 within a few doublings
        edge *= 2.0
        if edge > 1e6:
            raise ArithmeticError(f"fit_strength: no root of the score for wins={wins}, losses={losses}, "
                                  f"ridge={ridge}.")
    lo, hi = sorted((0.0, sign * edge))
    return float(brentq(score, lo, hi, xtol=_BRENT_XTOL))


def fit_strengths(wins: np.ndarray, losses: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """:func:`fit_strength` elementwise. Bootstrap totals repeat few distinct (wins, losses) values
    (they are multiples of 1/2), so each distinct one is fitted once."""
    wins = np.asarray(wins, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    pairs = np.stack([wins.ravel(), losses.ravel()], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    fitted = np.array([fit_strength(w, l, ridge) for w, l in unique], dtype=np.float64)
    return fitted[np.asarray(inverse).ravel()].reshape(wins.shape)


def elo(theta: np.ndarray | float) -> np.ndarray | float:
    """The Elo-like rating of a strength: the base at 1000, +400 per factor 10 in the odds."""
    return ELO_BASE + ELO_PER_THETA * theta


def competition_ranks(strengths: np.ndarray) -> np.ndarray:
    """Rank of each column per row: 1 + the number of players strictly stronger (equal strengths
    share the better rank); a player with no strength (nan) gets nan and outranks no one."""
    s = np.atleast_2d(np.asarray(strengths, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        stronger = (s[:, None, :] > s[:, :, None]).sum(axis=2).astype(np.float64)
    return np.where(np.isnan(s), np.nan, 1.0 + stronger)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval over the replicates where the value is defined (as core.stats does)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _rank_ci(ranks: np.ndarray, alpha: float) -> list[int | None]:
    """Integer rank interval: the lower quantile rounded down, the upper rounded up."""
    ranks = ranks[np.isfinite(ranks)]
    if ranks.size == 0:
        return [None, None]
    return [int(np.quantile(ranks, alpha / 2, method="lower")), int(np.quantile(ranks, 1 - alpha / 2, method="higher"))]


# --------------------------------------------------------------------------------------------
# records -> per-object battle totals
# --------------------------------------------------------------------------------------------
def pair_outcome(rec: Mapping[str, Any]) -> tuple[float, float]:
    """(arm's wins, base's wins) of one judged pair: 1/0, 0/1, or half each for a flip (a tie)."""
    if not rec["consistent"]:
        return (0.5, 0.5)
    if rec["winner"] == "x":
        return (1.0, 0.0)
    if rec["winner"] == "y":
        return (0.0, 1.0)
    raise ValueError(f"pair {rec.get('pair_id')}: a consistent verdict must name winner 'x' or 'y', "
                     f"got {rec['winner']!r}; rebuild the records with judges.protocol.pair_verdicts.")


def _arm_totals(records: Sequence[Mapping[str, Any]], arm: str, m: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """object id -> [wins, losses, W, L, F] of one arm against the base, flagged objects left out."""
    flagged = {str(o) for o in m.get("flagged_objects", [])}
    out: dict[str, np.ndarray] = {}
    for rec in records:
        if rec["arm"] != arm or str(rec["object_id"]) in flagged:
            continue
        w, l = pair_outcome(rec)
        t = out.setdefault(str(rec["object_id"]), np.zeros(5))
        t += [w, l, rec["consistent"] and rec["winner"] == "x", rec["consistent"] and rec["winner"] == "y",
              not rec["consistent"]]
    counts = np.sum(list(out.values()), axis=0) if out else np.zeros(5)
    found = tuple(int(c) for c in counts[2:])
    if found != (m["W"], m["L"], m["F"]):
        raise ValueError(f"arm {arm}: its eval log gives W/L/F = {found[0]}/{found[1]}/{found[2]} but "
                         f"metrics/arms/{arm}.json says {m['W']}/{m['L']}/{m['F']}; the metrics are stale: "
                         f"rerun arm-metrics@{arm} (dvc repro).")
    return out


# --------------------------------------------------------------------------------------------
# the ranking
# --------------------------------------------------------------------------------------------
def _regime_ranking(arm_names: Sequence[str], totals: Mapping[str, Mapping[str, np.ndarray]],
                    arms: Mapping[str, Mapping[str, Any]], settings: ReportSettings, ridge: float,
                    alpha: float) -> dict[str, Any]:
    objects = sorted(set().union(*(totals[a] for a in arm_names)))
    # rows: objects; columns: (wins, losses) of each arm against the base
    x = np.zeros((len(objects), 2 * len(arm_names)))
    for j, arm in enumerate(arm_names):
        for i, oid in enumerate(objects):
            if oid in totals[arm]:
                x[i, 2 * j:2 * j + 2] = totals[arm][oid][:2]
    point = x.sum(axis=0)
    theta = fit_strengths(point[0::2], point[1::2], ridge)
    boot = stats.resample_counts(len(objects), settings.n_boot, settings.seed).astype(np.float64) @ x
    theta_boot = fit_strengths(boot[:, 0::2], boot[:, 1::2], ridge)
    players = [BASE, *arm_names]
    # the base is column 0, fixed at 0 in every replicate (the anchor)
    strengths = np.concatenate([[0.0], theta])
    ranks = competition_ranks(strengths)[0]
    ranks_boot = competition_ranks(np.concatenate([np.zeros((settings.n_boot, 1)), theta_boot], axis=1))

    out_players: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(players):
        if j == 0:
            lo, hi = 0.0, 0.0
            entry: dict[str, Any] = {"display": "base", "n": None, "W": None, "L": None, "F": None,
                                     "tie_adjusted": None, "diverged": False, "trained": True}
        else:
            lo, hi = _percentile_ci(theta_boot[:, j - 1], alpha)
            m = arms[name]
            w, l = point[2 * (j - 1)], point[2 * (j - 1) + 1]
            entry = {"display": m["display"], "n": m["n"], "W": m["W"], "L": m["L"], "F": m["F"],
                     "tie_adjusted": stats.clean(w / (w + l)) if w + l > 0 else None,
                     "diverged": bool(m["diverged"]), "trained": m["train"].get("trained", True) is not False}
        t = float(strengths[j])
        entry.update({
            "strength": stats.clean(t), "strength_ci": [stats.clean(lo), stats.clean(hi)],
            "elo": stats.clean(elo(t)), "elo_ci": [stats.clean(elo(lo)), stats.clean(elo(hi))],
            "win_prob_vs_base": stats.clean(expit(t)),
            "win_prob_vs_base_ci": [stats.clean(expit(lo)), stats.clean(expit(hi))],
            "rank": None if math.isnan(ranks[j]) else int(ranks[j]), "rank_ci": _rank_ci(ranks_boot[:, j], alpha)})
        out_players[name] = entry
    # rank order; equal strengths keep the base first, then params order
    order = sorted(range(len(players)), key=lambda k: (-strengths[k] if math.isfinite(strengths[k]) else math.inf, k))
    return {"n_objects": len(objects), "order": [players[k] for k in order], "players": out_players}


def ranking(records: Sequence[Mapping[str, Any]], arms: Mapping[str, Mapping[str, Any]], settings: ReportSettings,
            *, ridge: float = RIDGE, alpha: float = ALPHA) -> dict[str, Any]:
    """The content of ``metrics/ranking.json``: per regime (clean, mild, medium, severe, those with
    arms), every player's strength θ, Elo-like rating, win probability against the base, rank, each
    with a 95 % bootstrap interval, plus W/L/F and the diverged flag of each arm.

    ``records``: pair records tagged with ``arm`` (x = arm, y = base), as ``arm_pair_records`` gives;
    ``arms``: each arm's metrics (``metrics/arms/<arm>.json``). ``ridge`` must be > 0: with none, a
    bootstrap replicate in which an arm wins every drawn pair has no finite strength.
    """
    if not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ranking: ridge must be > 0 (got {ridge}); a replicate where an arm wins or loses "
                         "every pair has no finite maximum-likelihood strength without one.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"ranking: alpha must be in (0, 1), got {alpha}.")
    missing = [a for a in settings.arms if a not in arms]
    if missing:
        raise ValueError(f"ranking: no metrics for arm(s) {missing}: run arm-metrics@<arm> (dvc repro).")
    totals = {arm: _arm_totals(records, arm, arms[arm]) for arm in settings.arms}
    empty = [a for a, t in totals.items() if not t]
    if empty:
        raise ValueError(f"ranking: arm(s) {empty} have no judged pairs; run judge-eval@<arm> (dvc repro).")
    by_regime: dict[str, list[str]] = {}
    for arm, spec in settings.arms.items():
        by_regime.setdefault(spec.regime, []).append(arm)
    regimes = {r: _regime_ranking(by_regime[r], totals, arms, settings, ridge, alpha)
               for r in REGIMES if r in by_regime}
    return {"model": "bradley-terry", "graph": "star: every arm against the base of its regime",
            "anchor": BASE, "ties": "a flip is half a win to each side", "ridge": ridge,
            "elo_base": ELO_BASE, "elo_per_theta": stats.clean(ELO_PER_THETA), "alpha": alpha,
            "n_boot": settings.n_boot, "seed": settings.seed, "regimes": regimes}


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
RANKING_CSV = ("player", "regime", "arm", "intervention", "rank", "rank_lo", "rank_hi", "strength", "strength_lo",
               "strength_hi", "elo", "elo_lo", "elo_hi", "win_prob_vs_base", "win_prob_lo", "win_prob_hi", "n", "W",
               "L", "F", "tie_adjusted", "diverged", "calibration_reliable", "status")


def _rank_text(p: Mapping[str, Any]) -> str:
    lo, hi = p["rank_ci"]
    return f"{p['rank']} [{lo}, {hi}]" if lo is not None else f"{p['rank']} [n/a]"


def _player_status(p: Mapping[str, Any], name: str, cal: Mapping[str, Any]) -> str:
    if name == BASE:
        return "reference"
    if p["diverged"]:
        return "diverged"
    if not p["trained"]:
        return "untrained"
    return "ok" if cal["reliable"] else "unreliable"


def ranking_table(rank: Mapping[str, Any], cal: Mapping[str, Any], settings: ReportSettings) -> Table:
    """One row per player, regime by regime, in rank order. ``cal``: ``tables.calibration_view``."""
    header = ["Regime", "Rank [95% CI]", "Player", "Rating [95% CI]", "P(win vs base) [95% CI]", "W/L/F", "Status"]
    md_rows, csv_rows = [], []
    for regime, block in rank["regimes"].items():
        for name in block["order"]:
            p = block["players"][name]
            status = _player_status(p, name, cal)
            if name == BASE:
                player, wlf = f"base ({regime} inputs)", "—"
                rating, win = f"{fmt(ELO_BASE, digits=0)} (anchor)", "0.500 (anchor)"
            else:
                player = f"{p['display']} ({settings.arms[name].adapts_label})"
                wlf = f"{p['W']}/{p['L']}/{p['F']}"
                lo, hi = p["elo_ci"]
                rating = f"{fmt(p['elo'], digits=0)} [{fmt(lo, digits=0)}, {fmt(hi, digits=0)}]"
                win = f"{fmt(p['win_prob_vs_base'])} {fmt_ci(p['win_prob_vs_base_ci'])}"
            if status == "diverged":
                win = f"diverged ({win}*)"
            md_rows.append([regime, _rank_text(p), player, rating, win, wlf, status])
            csv_rows.append({
                "player": f"{name}@{regime}", "regime": regime, "arm": None if name == BASE else name,
                "intervention": p["display"], "rank": p["rank"], "rank_lo": p["rank_ci"][0], "rank_hi": p["rank_ci"][1],
                "strength": p["strength"], "strength_lo": p["strength_ci"][0], "strength_hi": p["strength_ci"][1],
                "elo": p["elo"], "elo_lo": p["elo_ci"][0], "elo_hi": p["elo_ci"][1],
                "win_prob_vs_base": p["win_prob_vs_base"], "win_prob_lo": p["win_prob_vs_base_ci"][0],
                "win_prob_hi": p["win_prob_vs_base_ci"][1], "n": p["n"], "W": p["W"], "L": p["L"], "F": p["F"],
                "tie_adjusted": p["tie_adjusted"], "diverged": p["diverged"], "calibration_reliable": cal["reliable"],
                "status": status})
    return Table(
        title="Ranking: Bradley–Terry strength of the base and every arm, per regime", status=_banner(cal),
        unreliable=not cal["reliable"], display=frame(header, md_rows), data=frame(RANKING_CSV, csv_rows),
        note=("One Bradley–Terry fit per regime, anchored at the base of that regime (rating 1000; +400 = 10:1 "
              "odds). Every arm met only the base (a star graph), so the order is the tie-adjusted win-rate order; a flip "
              f"counts as half a win each. L2 ridge {rank['ridge']} on the log-strength keeps a perfect record finite. "
              f"95 % percentile intervals from {rank['n_boot']} bootstrap resamples of objects shared by the players "
              "of a regime; rank = 1 + players strictly stronger. Ratings of different regimes are not comparable: "
              "each has its own base. * a diverged arm's figure is a divergence artifact, never a win."))
