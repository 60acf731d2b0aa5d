"""The study table, the severity table and the calibration block, as markdown, CSV and HTML.

Each table is a :class:`Table`: pandas DataFrames built from rows, rendered by one renderer (the
display frame as markdown and HTML, the data frame as CSV). Built only from
``metrics/arms/<arm>.json``, ``metrics/calibration.json`` and params, so ``verify`` rebuilds the
same text and compares it byte for byte. Rules the tables keep:
- a diverged arm reads "diverged", never as a win (its meets column is "no (diverged)");
- where a calibration control fails, every table is marked UNRELIABLE and says which control;
- geometry deltas with missing oracle values are flagged with the count left out;
- inputs from a user's images (``world.images_dir``) have no oracle: the tables say so in a NO ORACLE
  line and every oracle cell reads n/a.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from judge3d.report.arm_metrics import ReportSettings, field
from judge3d.report.confidence import DEFAULT_TARGET as CONFIDENCE_TARGET, margin_for_agreement, points_of
from judge3d.world.degrade import SEVERITIES

# Where each calibration number lives in metrics/calibration.json (dotted paths).
CALIBRATION_FIELDS = {
    "clear_gap_strict": "clear_gap.strict",
    "clear_gap_ci": "clear_gap.strict_wilson_ci",
    "clear_gap_n": "clear_gap.n",
    "clear_gap_pass": "clear_gap.pass",
    "clear_gap_threshold": "thresholds.clear_gap_min_strict",
    "bvb_decisive": "base_vs_base.decisive",
    "bvb_ci": "base_vs_base.decisive_ci",
    "bvb_flip": "base_vs_base.flip_rate",
    "bvb_n": "base_vs_base.n",
    "bvb_pass": "base_vs_base.pass",
    "bvb_range": "thresholds.base_vs_base_decisive_range",
    "headroom": "headroom",                 # {severity: {strict, strict_wilson_ci, n, ...}}
    "kappa": "agreement.kappa",
    "kappa_ci": "agreement.kappa_ci",
    "judge_oracle_agreement": "clear_gap.judge_oracle_agreement",
    "clear_gap_corruption": "clear_gap.corruption",   # {kind, level} of the degraded copy
    "clear_gap_flagged": "clear_gap.n_flagged",       # pairs set aside for a blank montage (e.g. a part-less blob)
    "kappa_n": "agreement.n",
    "confidence": "confidence",             # {judge role: report.confidence.confidence_metrics}
}
REQUIRED_CALIBRATION = ("clear_gap_strict", "clear_gap_pass", "bvb_decisive", "bvb_pass")


def _has(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def calibration_view(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration numbers the report uses, checked; a missing required one is an error."""
    view = {name: field(calibration, path) for name, path in CALIBRATION_FIELDS.items()}
    # presence, not value: decisive is legitimately null when every base-vs-base pair flipped
    missing = [CALIBRATION_FIELDS[k] for k in REQUIRED_CALIBRATION if not _has(calibration, CALIBRATION_FIELDS[k])]
    if missing:
        raise ValueError(f"metrics/calibration.json lacks {missing}; rerun the calibrate stage.")
    for key in ("clear_gap_pass", "bvb_pass"):
        if not isinstance(view[key], bool):
            raise ValueError(f"metrics/calibration.json: {CALIBRATION_FIELDS[key]} must be true/false, got {view[key]!r}.")
    failed = []
    if not view["clear_gap_pass"]:
        failed.append("clear-gap control failed: the evaluation judge does not reliably see a real quality gap")
    if not view["bvb_pass"]:
        failed.append("base-vs-base control failed: the evaluation judge has a systematic preference")
    view["reliable"] = not failed
    view["failures"] = failed
    return view


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------
def fmt(value: Any, signed: bool = False, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-", "−")


def fmt_ci(ci: Sequence[Any] | None, signed: bool = False) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "[n/a]"
    return f"[{fmt(ci[0], signed)}, {fmt(ci[1], signed)}]"


def _csv_num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --------------------------------------------------------------------------------------------
# the table renderer: one DataFrame -> markdown, CSV or HTML
# --------------------------------------------------------------------------------------------
def frame(header: Sequence[str], rows: Sequence[Mapping[str, Any] | Sequence[Any]]) -> pd.DataFrame:
    """Rows (mappings read by column name, or sequences in column order) as a DataFrame with exactly
    these columns. Object dtype keeps every value as given: ints stay ints, None stays None."""
    cells = [[r.get(h) for h in header] if isinstance(r, Mapping) else list(r) for r in rows]
    return pd.DataFrame(cells, columns=list(header), dtype=object)


def csv_text(df: pd.DataFrame) -> str:
    """CSV: empty for None, true/false for booleans, the shortest round-trip repr for floats."""
    return df.map(_csv_num).to_csv(index=False, lineterminator="\n")


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table with unpadded cells (``DataFrame.to_markdown`` would pad them through tabulate)."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def html_table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, justify="left", escape=True)


def _csv_text(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    return csv_text(frame(header, rows))


@dataclass(frozen=True, eq=False)       # eq would compare DataFrames element-wise
class Table:
    """One report table and the lines around it. ``display`` holds the formatted cells (markdown and
    HTML); ``data`` the raw values, one column per CSV field (None: the table has no CSV form)."""
    title: str
    status: str                 # the calibration line under the title, plain text
    display: pd.DataFrame
    note: str = ""
    data: pd.DataFrame | None = None
    unreliable: bool = False    # a calibration control failed: the status leads with a bold UNRELIABLE
    no_oracle: str = ""         # set when inputs are a user's images: a bold NO ORACLE line under the status

    def markdown(self) -> str:
        status = f"**UNRELIABLE**: {self.status}" if self.unreliable else self.status
        if self.no_oracle:
            status += f"\n\n**NO ORACLE**: {self.no_oracle}"
        text = f"# {self.title}\n\n{status}\n\n{markdown_table(self.display)}"
        return text + (f"\n{self.note}\n" if self.note else "")

    def csv(self) -> str:
        if self.data is None:
            raise ValueError(f"the table {self.title!r} has no CSV form")
        return csv_text(self.data)

    def html(self) -> str:
        """The fragment under the page's section heading (which replaces the title)."""
        status = (f'<p class="unreliable"><strong>UNRELIABLE</strong>: {html.escape(self.status)}</p>'
                  if self.unreliable else f"<p>{html.escape(self.status)}</p>")
        if self.no_oracle:
            status += f'\n<p class="unreliable"><strong>NO ORACLE</strong>: {html.escape(self.no_oracle)}</p>'
        parts = [status, html_table(self.display)]
        return "\n".join(parts + ([f"<p>{html.escape(self.note)}</p>"] if self.note else []))


def _banner(cal: Mapping[str, Any]) -> str:
    if cal["reliable"]:
        return "Calibration: both controls pass (see calibration.md)."
    return "; ".join(cal["failures"]) + ". Win-rates below cannot be read as true nulls or wins."


def no_oracle_text(arms: Mapping[str, Mapping[str, Any]]) -> str:
    """The NO ORACLE line when any arm's pairs lack ground truth (a user's images), else ""."""
    n = sum(int(m.get("n_no_oracle", 0)) for m in arms.values())
    if not n:
        return ""
    total = sum(int(m["n_manifest"]) for m in arms.values())
    return (f"the held-out inputs are a user's images (world.images_dir), which have no ground-truth shape, so "
            f"{n} of {total} arm–base pairs have no oracle score: Geom Δ, Oracle win and judge–oracle agreement "
            "read n/a there. The judge's win-rates stand on the judge alone.")


def oracle_win_text(ow: Mapping[str, Any]) -> str:
    if ow["n"] == 0 and ow.get("n_missing"):
        return f"n/a ({ow['n_missing']} missing)"
    return f"{fmt(ow['rate'])} ({ow['ties']})"


def judge_win_text(m: Mapping[str, Any]) -> str:
    """The judge-win cell: a diverged arm is labelled as such, never shown as a plain win."""
    base = fmt(m["strict"])
    if not m["train"].get("trained", True):
        return f"untrained ({base})"
    return f"diverged ({base}*)" if m["diverged"] else base


def meets_text(m: Mapping[str, Any], reliable: bool = True) -> str:
    if m["diverged"]:
        return "no (diverged)"
    if not m["train"].get("trained", True):
        return "no (untrained: no training pairs)"
    if m["meets_bar"]:
        return "yes" if reliable else "yes (unreliable: calibration failed)"
    return "no"


def geom_text(delta: Mapping[str, Any]) -> str:
    text = f"{fmt(delta['delta'], signed=True)} {fmt_ci(delta['delta_ci'], signed=True)}"
    if delta.get("n_missing"):
        text += f" ({delta['n_missing']} missing)"
    return text


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
STUDY_CSV = ("arm", "intervention", "adapts", "regime", "n", "W", "L", "F", "judge_win", "judge_win_wilson_lo",
             "judge_win_wilson_hi", "judge_win_boot_lo", "judge_win_boot_hi", "tie_adjusted", "flip_rate",
             "prefer_first_rate", "judge_oracle_agreement", "geom_delta", "geom_delta_lo", "geom_delta_hi",
             "geom_missing", "oracle_win_rate", "oracle_win_lo", "oracle_win_hi", "oracle_ties", "meets_bar", "bar",
             "diverged", "calibration_reliable", "status", "iou_delta", "fscore_delta", "watertight_delta",
             "components_delta", "degenerate_faces_delta", "fm_mse_before", "fm_mse_after", "feat_mse_before",
             "feat_mse_after", "implicit_accuracy", "n_unjudged", "n_flagged")


def probe_text(m: Mapping[str, Any]) -> str:
    """The arm's training probe: FM-MSE for flow arms, feature MSE for repair arms."""
    t = m["train"]
    if m["family"] == "repair":
        return f"feat {fmt(t['feat_mse_before'])}→{fmt(t['feat_mse_after'])}"
    return f"FM {fmt(t['fm_mse_before'])}→{fmt(t['fm_mse_after'])}"


def wlf_text(m: Mapping[str, Any]) -> str:
    """W/L/F, plus the objects set aside unjudged because a montage was blank or clipped."""
    flagged = m.get("n_flagged", 0)
    return f"{m['W']}/{m['L']}/{m['F']}" + (f" (+{flagged} flagged, unjudged)" if flagged else "")


def _delta(m: Mapping[str, Any], block: str, name: str) -> Any:
    return (m[block].get(name) or {}).get("delta")


def _status(m: Mapping[str, Any], cal: Mapping[str, Any]) -> str:
    if m["diverged"]:
        return "diverged"
    if not m["train"].get("trained", True):
        return "untrained"
    return "ok" if cal["reliable"] else "unreliable"


def study_table(arms: Mapping[str, Mapping[str, Any]], cal: Mapping[str, Any], settings: ReportSettings) -> Table:
    """The study table, one row per arm in params order."""
    bar = fmt(settings.bar, digits=2)
    header = ["Intervention (what is adapted)", "Regime", "Judge win", "Wilson 95% CI", "Bootstrap 95% CI",
              "W/L/F", "Flip rate", "Geom Δ [95% CI]", "Oracle win (ties)", "Probe before→after", f"meets ≥ {bar}?"]
    md_rows, csv_rows = [], []
    for name, spec in settings.arms.items():
        m = arms[name]
        score = m["geom"]["score"]
        ow = m["oracle_win"]
        md_rows.append([f"{m['display']} ({spec.adapts_label})", spec.regime_label, judge_win_text(m),
                        fmt_ci(m["strict_wilson_ci"]), fmt_ci(m["strict_boot_ci"]), wlf_text(m),
                        fmt(m["flip_rate"]), geom_text(score), oracle_win_text(ow), probe_text(m),
                        meets_text(m, cal["reliable"])])
        csv_rows.append({
            "arm": name, "intervention": m["display"], "adapts": spec.adapts_label, "regime": spec.regime, "n": m["n"],
            "W": m["W"], "L": m["L"], "F": m["F"], "judge_win": m["strict"],
            "judge_win_wilson_lo": m["strict_wilson_ci"][0], "judge_win_wilson_hi": m["strict_wilson_ci"][1],
            "judge_win_boot_lo": m["strict_boot_ci"][0], "judge_win_boot_hi": m["strict_boot_ci"][1],
            "tie_adjusted": m["tie_adjusted"], "flip_rate": m["flip_rate"], "prefer_first_rate": m["prefer_first_rate"],
            "judge_oracle_agreement": m["judge_oracle_agreement"], "geom_delta": score["delta"],
            "geom_delta_lo": score["delta_ci"][0], "geom_delta_hi": score["delta_ci"][1],
            "geom_missing": score["n_missing"], "oracle_win_rate": ow["rate"], "oracle_win_lo": ow["rate_ci"][0],
            "oracle_win_hi": ow["rate_ci"][1], "oracle_ties": ow["ties"], "meets_bar": m["meets_bar"],
            "bar": settings.bar, "diverged": m["diverged"], "calibration_reliable": cal["reliable"],
            "status": _status(m, cal), "iou_delta": _delta(m, "geom", "iou"), "fscore_delta": _delta(m, "geom", "fscore"),
            "watertight_delta": _delta(m, "validity", "watertight"),
            "components_delta": _delta(m, "validity", "components"),
            "degenerate_faces_delta": _delta(m, "validity", "degenerate_faces"),
            **{k: m["train"].get(k) for k in ("fm_mse_before", "fm_mse_after", "feat_mse_before", "feat_mse_after",
                                              "implicit_accuracy")},
            "n_unjudged": m["n_unjudged"], "n_flagged": m.get("n_flagged", 0)})
    n_text = sorted({m["n"] for m in arms.values()})
    return Table(
        title="Study table: evaluation-judge win-rate of each arm against the base", status=_banner(cal),
        unreliable=not cal["reliable"], no_oracle=no_oracle_text(arms),
        display=frame(header, md_rows), data=frame(STUDY_CSV, csv_rows),
        note=f"Judge win = strict win-rate W/n (swap-consistent wins of the arm), n = {', '.join(map(str, n_text))} "
            "held-out objects; CIs are 95 % (Wilson; bootstrap over objects). Geom Δ = mean arm − base oracle score "
            "(paired bootstrap CI). Oracle win = share of objects whose arm mesh has the higher oracle score "
            "(ties in brackets). Flagged: objects whose arm or base montage was blank or clipped, never judged. "
            "* a diverged arm's judge figure is a divergence artifact, never a win.")


SEVERITY_CSV = ("severity", "arm", "n", "spec_win", "spec_win_lo", "spec_win_hi", "headroom", "headroom_lo",
                "headroom_hi", "geom_delta", "geom_delta_lo", "geom_delta_hi", "feat_mse_before", "feat_mse_after",
                "diverged", "calibration_reliable")


def repair_arms_by_severity(arms: Mapping[str, Mapping[str, Any]], settings: ReportSettings) -> list[tuple[str, str]]:
    """(severity, arm) for the repair arms, mild → severe."""
    found = [(spec.regime, name) for name, spec in settings.arms.items() if spec.family == "repair"]
    return sorted(found, key=lambda sa: (SEVERITIES.index(sa[0]), sa[1]))


def severity_table(arms: Mapping[str, Mapping[str, Any]], cal: Mapping[str, Any], settings: ReportSettings) -> Table:
    header = ["Severity", "Spec-vs-base win [95% CI]", "Clear-gap (headroom) [95% CI]", "Geom Δ [95% CI]",
              "Adapter feat-MSE before→after"]
    headroom = cal.get("headroom") or {}
    md_rows, csv_rows = [], []
    for severity, name in repair_arms_by_severity(arms, settings):
        m = arms[name]
        h = headroom.get(severity) or {}
        h_ci = h.get("strict_wilson_ci") or [None, None]
        score = m["geom"]["score"]
        t = m["train"]
        win = judge_win_text(m) + " " + fmt_ci(m["strict_wilson_ci"])
        md_rows.append([severity.capitalize(), win, f"{fmt(h.get('strict'))} {fmt_ci(h_ci)}", geom_text(score),
                        f"{fmt(t['feat_mse_before'])}→{fmt(t['feat_mse_after'])}"])
        csv_rows.append({"severity": severity, "arm": name, "n": m["n"], "spec_win": m["strict"],
                         "spec_win_lo": m["strict_wilson_ci"][0], "spec_win_hi": m["strict_wilson_ci"][1],
                         "headroom": h.get("strict"), "headroom_lo": h_ci[0], "headroom_hi": h_ci[1],
                         "geom_delta": score["delta"], "geom_delta_lo": score["delta_ci"][0],
                         "geom_delta_hi": score["delta_ci"][1], "feat_mse_before": t["feat_mse_before"],
                         "feat_mse_after": t["feat_mse_after"], "diverged": m["diverged"],
                         "calibration_reliable": cal["reliable"]})
    return Table(
        title="Severity table: conditioner repair across degradation severity", status=_banner(cal),
        unreliable=not cal["reliable"], no_oracle=no_oracle_text({n: arms[n] for _, n in repair_arms_by_severity(arms, settings)}),
        display=frame(header, md_rows), data=frame(SEVERITY_CSV, csv_rows),
        note="Clear-gap (headroom) = the evaluation judge's strict win of the base on the clean input over the base "
             "on the input degraded at that severity: how much a repair could win back.")


def _clear_gap_label(cal: Mapping[str, Any]) -> str:
    c = cal.get("clear_gap_corruption")
    what = f"{c['kind']} level {c['level']}" if isinstance(c, Mapping) else "deliberately degraded"
    flagged = cal.get("clear_gap_flagged")
    extra = f"; {flagged} blank pair(s) set aside" if flagged else ""
    return f"clear-gap (output vs its {what} copy, n = {cal.get('clear_gap_n')}{extra})"


# The seed study's training signal (its training judge on high vs low budget), printed beside ours.
SEED_TRAINING_SIGNAL = 0.89


def calibration_block(cal: Mapping[str, Any], labels: Mapping[str, Any] | None = None) -> Table:
    """The calibration controls (the eval judge), then information rows: headroom per severity, the
    training signal (the training judge on high vs low budget, from ``labels``) and kappa."""
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    rng = cal.get("bvb_range")
    rng_text = f"in [{fmt(rng[0], digits=2)}, {fmt(rng[1], digits=2)}]" if rng else "near 0.5"
    thr = cal.get("clear_gap_threshold")
    rows = [[_clear_gap_label(cal), "strict win", f"{fmt(cal['clear_gap_strict'])} {fmt_ci(cal['clear_gap_ci'])}",
             f"≥ {fmt(thr, digits=2)}" if thr is not None else "high", verdict(cal["clear_gap_pass"])],
            ["base-vs-base (two seeds)", "decisive", f"{fmt(cal['bvb_decisive'])} {fmt_ci(cal['bvb_ci'])}",
             rng_text, verdict(cal["bvb_pass"])],
            ["base-vs-base (two seeds)", "flip rate", fmt(cal["bvb_flip"]), "high (no real gap)", "info"]]
    for severity in SEVERITIES:
        h = (cal.get("headroom") or {}).get(severity)
        if h:
            rows.append([f"headroom ({severity})", "strict win",
                         f"{fmt(h.get('strict'))} {fmt_ci(h.get('strict_wilson_ci'))}", "info", "info"])
    if labels is not None:
        rows.append(["training signal (training judge, high vs low budget; not a control)", "strict win",
                     f"{fmt(labels.get('strict_win_high_over_low'))} {fmt_ci(labels.get('strict_wilson_ci'))}",
                     f"the study: {fmt(SEED_TRAINING_SIGNAL, digits=2)}", "info"])
    if cal.get("kappa") is not None:
        rows.append([f"inter-judge agreement (all {cal.get('kappa_n')} calibration pairs)", "Cohen's κ",
                     f"{fmt(cal['kappa'])} {fmt_ci(cal['kappa_ci'])}", "info", "info"])
    status = "RELIABLE: both controls pass." if cal["reliable"] else "; ".join(cal["failures"]) + "."
    return Table(title="Calibration of the evaluation judge", status=status, unreliable=not cal["reliable"],
                 display=frame(["control", "statistic", "value [95% CI]", "criterion", "result"], rows))


def report_tables(arms: Mapping[str, Mapping[str, Any]], calibration: Mapping[str, Any],
                  settings: ReportSettings, labels: Mapping[str, Any] | None = None) -> dict[str, Table]:
    """Every table of the report, by file stem: ``study_table``, ``severity_table``, ``calibration``,
    and ``confidence`` where the calibration metrics hold the judges' confidence curves."""
    missing = [a for a in settings.arms if a not in arms]
    if missing:
        raise ValueError(f"no metrics for arm(s) {missing}: run arm-metrics@<arm> (dvc repro).")
    cal = calibration_view(calibration)
    tables = {"study_table": study_table(arms, cal, settings), "severity_table": severity_table(arms, cal, settings),
              "calibration": calibration_block(cal, labels)}
    if cal.get("confidence"):
        tables["confidence"] = confidence_table(cal["confidence"])
    return tables


def build_tables(arms: Mapping[str, Mapping[str, Any]], calibration: Mapping[str, Any],
                 settings: ReportSettings, labels: Mapping[str, Any] | None = None) -> dict[str, str]:
    """File name (under reports/) -> text, for every table the report writes (markdown, and CSV where
    the table has a data frame)."""
    out = {}
    for stem, table in report_tables(arms, calibration, settings, labels).items():
        out[f"{stem}.md"] = table.markdown()
        if table.data is not None:
            out[f"{stem}.csv"] = table.csv()
    return out


CONFIDENCE_TABLE_CSV = ("role", "n_oracle", "oracle_ties", "oracle_missing", "ece", "ece_lo", "ece_hi", "brier",
                        "agreement_all", "agreement_all_lo", "agreement_all_hi", "coverage_all", "swap_coverage",
                        "swap_agreement", "swap_agreement_lo", "swap_agreement_hi", "target", "target_margin",
                        "target_coverage", "target_agreement", "target_n")


def confidence_table(conf_by_role: Mapping[str, Mapping[str, Any]], target: float = CONFIDENCE_TARGET) -> Table:
    """Per judge role (e.g. ``eval``, ``train``): ECE [CI], Brier, agreement with no filter, the swap
    filter's (coverage, agreement) and the smallest margin whose agreement reaches ``target``."""
    if not conf_by_role:
        raise ValueError("confidence_table: no judges; pass {role: confidence_metrics(...)}.")
    t = fmt(target, digits=2)
    header = ["judge", "pairs with oracle (ties/missing)", "ECE [95% CI]", "Brier", "agreement, no filter [95% CI]",
              "swap filter: coverage, agreement", f"margin for agreement ≥ {t}", "coverage there"]
    md_rows, csv_rows = [], []
    for role, conf in conf_by_role.items():
        rel = conf["reliability"]
        none = points_of(conf, "none")[0]
        swap = points_of(conf, "swap")[0]
        hit = margin_for_agreement(conf, target)
        md_rows.append([role, f"{conf['n_oracle']} ({conf['oracle_ties']}/{conf['oracle_missing']})",
                        f"{fmt(rel['ece'])} {fmt_ci(rel['ece_ci'])}", fmt(rel["brier"]),
                        f"{fmt(none['agreement'])} {fmt_ci(none['agreement_ci'])}",
                        f"{fmt(swap['coverage'])}, {fmt(swap['agreement'])} {fmt_ci(swap['agreement_ci'])}",
                        "never" if hit is None else f"{fmt(hit['margin'], digits=2)} (n = {hit['n']})",
                        "n/a" if hit is None else fmt(hit["coverage"])])
        csv_rows.append({"role": role, "n_oracle": conf["n_oracle"], "oracle_ties": conf["oracle_ties"],
                         "oracle_missing": conf["oracle_missing"], "ece": rel["ece"], "ece_lo": rel["ece_ci"][0],
                         "ece_hi": rel["ece_ci"][1], "brier": rel["brier"], "agreement_all": none["agreement"],
                         "agreement_all_lo": none["agreement_ci"][0], "agreement_all_hi": none["agreement_ci"][1],
                         "coverage_all": none["coverage"], "swap_coverage": swap["coverage"],
                         "swap_agreement": swap["agreement"], "swap_agreement_lo": swap["agreement_ci"][0],
                         "swap_agreement_hi": swap["agreement_ci"][1], "target": target,
                         "target_margin": None if hit is None else hit["margin"],
                         "target_coverage": None if hit is None else hit["coverage"],
                         "target_agreement": None if hit is None else hit["agreement"],
                         "target_n": None if hit is None else hit["n"]})
    return Table(
        title="Confidence: reliability and coverage against the oracle",
        status="Measured on the pairs whose candidates have different oracle scores; no gate.",
        display=frame(header, md_rows), data=frame(CONFIDENCE_TABLE_CSV, csv_rows),
        note="s = (p_xy + 1 − p_yx)/2, the debiased soft preference that x is better. ECE = Σ_b (n_b/N)·|observed_b − "
             "mean s_b| over equal-width bins of s (object-bootstrap 95 % CI); Brier = mean (s − [x oracle-better])². "
             "Agreement = share of kept verdicts that pick the oracle-better candidate (Wilson 95 % CI); coverage = "
             "kept share. No filter: the side of s decides. Swap filter: swap-consistent pairs only. Margin filter: "
             f"|s − 0.5| ≥ m; the table gives the smallest m whose agreement reaches {t}, with its n.")
