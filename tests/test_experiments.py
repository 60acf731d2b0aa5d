"""Sweep tables from DVC experiments (judge3d.report.experiments, `judge3d exp-table`).

tests/data/dvc_exp_show.json is real `dvc exp show --json` output (DVC 3.67.1, trimmed: deps emptied) of a
throwaway repo whose one stage writes the study's metrics files with their real key names from its params:
a baseline (method.beta 0.1, train_seed 0), finished runs beta-0.5, beta-5, beta-50, seed-1, seed-2, a failed
beta-13 and a queued beta-500. tests/data/dvc_exp_files.json holds those metrics files whole, as `git show
<rev>:<path>` gave them, by rev.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from judge3d.report import experiments as X
from judge3d.report.tables import fmt_ci

DATA = Path(__file__).parent / "data"
DPO = "metrics/arms/dpo.json"


@pytest.fixture(scope="module")
def shown() -> list[X.Experiment]:
    return X.parse_exp_show(json.loads((DATA / "dvc_exp_show.json").read_text()))


@pytest.fixture(scope="module")
def files() -> dict:
    return json.loads((DATA / "dvc_exp_files.json").read_text())


@pytest.fixture(scope="module")
def exps(shown, files) -> list[X.Experiment]:
    filled, warnings = X.fill_full_metrics(shown, lambda rev, path: files.get(rev, {}).get(path))
    assert warnings == []
    return filled


def by_name(exps, name):
    return next(e for e in exps if e.name == name)


def test_parse_rows_states_and_flattened_keys(shown):
    assert [e.state for e in shown[:2]] == ["workspace", "commit"]
    head = shown[1]
    assert shown[0].baseline == head.rev
    states = {e.name: e.state for e in shown[2:]}
    assert states == {"beta-0.5": "success", "beta-5": "success", "beta-50": "success", "seed-1": "success",
                      "seed-2": "success", "beta-13": "failed", "beta-500": "queued"}
    assert all(e.baseline == head.rev for e in shown[2:])
    assert by_name(shown, "beta-5").params["method.beta"] == 5
    assert by_name(shown, "seed-2").params["train_seed"] == 2
    assert by_name(shown, "seed-2").params["calibrate.thresholds.base_vs_base_decisive"] == [0.35, 0.65]
    assert set(head.metrics) == {DPO, "metrics/arms/orpo.json", "metrics/calibration.json", "metrics/labels.json"}
    assert "train.fm_mse_after" in head.metrics[DPO]
    # failed runs show their baseline's metrics, queued ones none: neither is a finished run
    failed, queued = by_name(shown, "beta-13"), by_name(shown, "beta-500")
    assert failed.error and failed.metrics and not failed.finished
    assert queued.metrics == {} and not queued.finished


def test_dvc_drops_lists_and_fill_restores_them(shown, exps, files):
    head_shown, head = shown[1], exps[1]
    assert "strict_wilson_ci" not in head_shown.metrics[DPO]          # what DVC 3 does to every CI
    assert "train.feat_mse_after" not in head_shown.metrics[DPO]      # and to nulls
    assert head.metrics[DPO]["strict_wilson_ci"] == files[head.rev][DPO]["strict_wilson_ci"]
    assert head.full == frozenset(head.metrics)
    assert not by_name(exps, "beta-13").full                          # unfinished runs are not read


def test_fill_warns_on_unreadable_and_rejects_a_different_file(shown, files):
    filled, warnings = X.fill_full_metrics(shown, lambda rev, path: None if rev == "workspace"
                                           else files.get(rev, {}).get(path), paths=[DPO])
    assert len(warnings) == 1 and "workspace" in warnings[0] and DPO in warnings[0]
    assert "strict_wilson_ci" not in filled[0].metrics[DPO] and "strict_wilson_ci" in filled[1].metrics[DPO]
    assert "strict_wilson_ci" not in filled[1].metrics["metrics/labels.json"]   # not in paths: left as shown

    def stale(rev, path):
        data = json.loads(json.dumps(files.get(rev, {}).get(path)))
        data["strict"] = data["strict"] + 0.5
        return data
    with pytest.raises(X.ExperimentsError, match="does not match `dvc exp show`.*strict"):
        X.fill_full_metrics(shown, stale, paths=[DPO])


def test_beta_table_rows_cells_and_note(exps, files):
    table = X.study_table("beta", exps)
    rows = table.display
    assert list(rows["experiment"]) == ["master", "beta-0.5", "beta-5", "beta-50"]   # sorted by β
    assert list(rows["β"]) == ["0.1", "0.5", "5", "50"]
    for _, row in rows.iterrows():
        exp = by_name(exps, row["experiment"])
        m = files[exp.rev][DPO]
        assert row["judge strict win [CI]"].endswith(fmt_ci(m["strict_wilson_ci"]))
        assert row["diverged"] == ("yes" if m["diverged"] else "no")
    assert "beta-500 (queued)" in table.note and "beta-13 (failed)" in table.note
    assert "seed-1" in table.note and "seed-1" not in list(rows["experiment"])
    data = table.data
    assert list(data[f"{DPO}:train.fm_mse_after"]) == [files[by_name(exps, n).rev][DPO]["train"]["fm_mse_after"]
                                                        for n in rows["experiment"]]
    assert "| experiment | β |" in table.markdown() and table.csv().startswith("experiment,rev,method.beta,")


def test_workspace_row_only_when_it_differs_from_the_commit(exps):
    names = [e.name for e in X.select_sweep(exps, "method.beta").rows]
    assert "workspace" not in names                                   # identical to master: one row
    moved = X.Experiment("workspace", "workspace", "workspace", {**exps[1].params, "method.beta": 2.0},
                         exps[1].metrics, baseline=exps[1].rev)
    rows = X.select_sweep([moved, *exps[1:]], "method.beta").rows
    assert [e.name for e in rows][:3] == ["master", "beta-0.5", "workspace"]
    other = X.Experiment("workspace", "workspace", "workspace", {**exps[1].params, "method.reduction": "sum"},
                         exps[1].metrics, baseline=exps[1].rev)
    assert "workspace" not in [e.name for e in X.select_sweep([other, *exps[1:]], "method.beta").rows]


def test_a_column_key_in_no_experiment_is_an_error_naming_it(exps):
    cols = [X.Column("win", DPO, "strictt")]
    with pytest.raises(X.ExperimentsError, match=r"key 'strictt' is in no experiment's metrics/arms/dpo.json; "
                                                 r"did you mean 'strict'"):
        X.sweep_table(exps, "method.beta", cols)
    with pytest.raises(X.ExperimentsError, match="no experiment has metrics file 'metrics/arms/dpoo.json'"):
        X.sweep_table(exps, "method.beta", [X.Column("win", "metrics/arms/dpoo.json", "strict")])
    with pytest.raises(X.ExperimentsError, match="sweep param 'method.betta'.*did you mean 'method.beta'"):
        X.sweep_table(exps, "method.betta", [X.Column("win", DPO, "strict")])
    # in some experiments only: a dash there, no error
    partial = [X.Experiment(e.name, e.rev, e.state, e.params,
                            {**e.metrics, DPO: {**e.metrics[DPO], "extra": 1.0}} if e.name == "beta-5" else e.metrics,
                            baseline=e.baseline, error=e.error, full=e.full) for e in exps]
    cells = list(X.sweep_table(partial, "method.beta", [X.Column("extra", DPO, "extra")]).display["extra"])
    assert cells == [X.MISSING, X.MISSING, "1.000", X.MISSING]


def test_ci_column_without_the_files_read_whole_says_why(shown):
    with pytest.raises(X.ExperimentsError, match="strict_wilson_ci.*leaves out lists such as CIs"):
        X.study_table("beta", shown)


def _seed_exp(seed: int, value, params=None) -> X.Experiment:
    base = {"train_seed": seed, "gate": 0.83, "range": [0.35, 0.65]}
    metrics = {"m.json": {"x": value, "x_ci": [value - 0.1, value + 0.1]} if value is not None else {"y": 1}}
    if seed == 0:
        return X.Experiment("main", "c0", "commit", {**base, **(params or {})}, metrics)
    return X.Experiment(f"seed-{seed}", f"e{seed}", "success", {**base, **(params or {})}, metrics, baseline="c0")


def test_spread_statistics_and_criteria_on_synthetic_seeds():
    exps = [_seed_exp(0, 0.9), _seed_exp(1, 0.8), _seed_exp(2, None)]
    assert X.spread([0.9, 0.8, None, "a"]) == {"n": 2, "mean": pytest.approx(0.85), "min": 0.8, "max": 0.9}
    assert X.spread([None])["n"] == 0
    table = X.spread_table(exps, "train_seed", [X.Column("x", "m.json", "x", ci="x_ci", criterion=">= {gate}")])
    row = table.display.iloc[0]
    assert list(table.display.columns)[1:4] == ["train_seed=0", "train_seed=1", "train_seed=2"]
    assert row["train_seed=0"] == "0.900 [0.800, 1.000]" and row["train_seed=2"] == X.MISSING
    assert row["mean"] == "0.850 (of 2)" and row["[min, max]"] == "[0.800, 0.900]"
    assert row["criterion"] == ">= 0.83"
    assert row["holds in every train_seed"] == "no (train_seed=1: 0.800)"
    assert table.data.iloc[0]["holds"] is False
    # holds in each seed that has it, but one lacks it: not a yes
    ok = [_seed_exp(0, 0.9), _seed_exp(1, 0.85), _seed_exp(2, None)]
    holds, text, _ = X.holds_everywhere(X.Column("x", "m.json", "x", criterion=">= 0.83"), ok,
                                        ["s0", "s1", "s2"])
    assert holds is None and text == "n/a (missing in s2)"
    holds, text, _ = X.holds_everywhere(X.Column("x", "m.json", "x", criterion=">= 0.83"), ok[:2], ["s0", "s1"])
    assert holds is True and text == "yes"


@pytest.mark.parametrize("criterion, value, expected", [
    (">= 0.83", 0.83, True), (">= 0.83", 0.829, False), ("> 0.5", 0.5, False), ("< 0", -0.01, True),
    ("< 0", 0.0, False), ("<= 0", 0.0, True), ("== 1", True, True), ("in [0.35, 0.65]", 0.35, True),
    ("in [0.35, 0.65]", 0.651, False), ("in {range}", 0.5, True), (">= {gate}", 0.8, False), ("< 0", None, None),
    ("< 0", "text", None),
])
def test_criterion_evaluation(criterion, value, expected):
    assert X.criterion_holds(criterion, value, {"gate": 0.83, "range": [0.35, 0.65]}) is expected


@pytest.mark.parametrize("criterion, message", [
    ("at least 0.8", "write `>= 0.83`"), (">= {nope}", "no param 'nope'"), ("in 0.5", "`in` needs"),
    (">= [1, 2]", "needs a number"), (">= abc", "neither a number"),
])
def test_bad_criterion_is_an_error(criterion, message):
    with pytest.raises(X.ExperimentsError, match=message):
        X.criterion_holds(criterion, 0.5, {"gate": 0.83})


def test_seeds_table_from_the_fixture(exps, files):
    table = X.study_table("seeds", exps)
    rows = table.display.set_index("number")
    assert list(table.display.columns)[1:4] == ["train_seed=0", "train_seed=1", "train_seed=2"]
    # one row per severity and two per arm, from the baseline's params
    wanted = {"headroom mild strict", "headroom severe strict", "dpo judge strict win", "orpo oracle win"}
    assert wanted <= set(rows.index)
    gate = exps[1].params["calibrate.thresholds.clear_gap_min_strict"]
    values = [files[by_name(exps, n).rev]["metrics/calibration.json"]["clear_gap"]["strict"]
              for n in ("master", "seed-1", "seed-2")]
    assert rows.loc["clear-gap strict", "criterion"] == f">= {gate:g}"
    assert rows.loc["clear-gap strict", "holds in every train_seed"].startswith("yes" if min(values) >= gate else "no")
    assert rows.loc["clear-gap strict", "[min, max]"] == fmt_ci([min(values), max(values)])
    assert "beta-5" in table.note                                      # a β run is not a seed


def test_cli_exp_table(tmp_path, monkeypatch, capsys):
    from judge3d.cli import main

    monkeypatch.chdir(tmp_path)         # not a git repo: the metrics files cannot be read whole
    assert main(["exp-table", "beta", "--json", str(DATA / "dvc_exp_show.json")]) == 2
    err = capsys.readouterr().err
    assert "could not read metrics/arms/dpo.json at master" in err and "leaves out lists such as CIs" in err
    assert main(["exp-table", "gamma", "--json", str(DATA / "dvc_exp_show.json")]) == 2
    assert "no sweep 'gamma'; sweeps: beta, seeds" in capsys.readouterr().err


def _reference_exp(name: str, reference: bool, prefer_first: float, headroom: float) -> X.Experiment:
    params = {"judges.eval.reference": reference, "calibrate.severities": ["severe"], "arms.dpo.kind": "dpo"}
    cal = {"clear_gap": {"strict": 0.5, "strict_wilson_ci": [0.3, 0.7]},
           "base_vs_base": {"decisive": 0.5, "decisive_ci": [0.3, 0.7]},
           "headroom": {"severe": {"strict": headroom, "strict_wilson_ci": [headroom - 0.1, headroom + 0.1]}},
           "judge_oracle_agreement": 0.6, "judge_oracle_agreement_ci": [0.5, 0.7],
           "eval_judge_all_pairs": {"prefer_first_rate": prefer_first, "prefer_first_rate_ci": [0.4, 0.9],
                                    "flip_rate": 0.2, "flip_rate_ci": [0.1, 0.3]}}
    arm = {"strict": 0.4, "strict_wilson_ci": [0.2, 0.6], "oracle_win": {"rate": 0.1, "rate_ci": [0.0, 0.2]}}
    metrics = {X.CALIBRATION: X.flatten(cal), "metrics/arms/dpo.json": X.flatten(arm)}  # as parse_exp_show gives them
    if name == "main":
        return X.Experiment(name, "c0", "commit", params, metrics)
    return X.Experiment(name, "e1", "success", params, metrics, baseline="c0")


def test_reference_table_puts_the_reference_aware_judge_beside_the_reference_free_one():
    exps = [_reference_exp("main", False, 0.5, 0.44), _reference_exp("reference-aware", True, 0.8, 0.9)]
    table = X.study_table("reference", exps)
    shown = table.display
    assert len(shown) == 2
    assert {"headroom severe strict", "prefer-first rate", "dpo judge strict win", "dpo oracle win"} <= set(shown.columns)
    cells = shown.set_index(shown.columns[0])
    assert cells.loc[:, "prefer-first rate"].str.startswith(("0.500", "0.800")).all()
    assert sorted(cells["headroom severe strict"].str[:5]) == ["0.440", "0.900"]


def test_baseline_commits_of_one_run_count_once_in_a_sweep():
    """`--all-commits`: seed-1 and seed-2 were queued from two commits that rebuilt the same train_seed 0
    run, and the newest commit holds it too. That run is one row, not three (it would weigh three times in
    the mean); a commit whose metrics differ (other code) stays a row of its own."""
    m0, m_other = {DPO: {"strict": 0.4}}, {DPO: {"strict": 0.3}}
    commit = lambda rev, metrics: X.Experiment(rev, rev, "commit", {"train_seed": 0}, metrics)  # noqa: E731
    run = lambda name, base, seed: X.Experiment(name, name, "success", {"train_seed": seed},  # noqa: E731
                                                {DPO: {"strict": 0.1 * seed}}, baseline=base)
    exps = [commit("main", m0), commit("c2", m0), commit("c1", m0), run("seed-2", "c2", 2), run("seed-1", "c1", 1)]
    assert [e.name for e in X.select_sweep(exps, "train_seed").rows] == ["main", "seed-1", "seed-2"]
    exps[2] = commit("c1", m_other)
    assert [e.name for e in X.select_sweep(exps, "train_seed").rows] == ["c1", "main", "seed-1", "seed-2"]
