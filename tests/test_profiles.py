"""Profiles: applied in place without touching any other byte of params.yaml, undone by `mini`,
and shown as `dvc exp run -S` overrides that DVC turns into the same values."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from judge3d import cli
from judge3d.core.config import ParamsError, deep_merge, load_params
from judge3d.core.profiles import apply_profile, leaves, load_profile

REPO = Path(__file__).resolve().parents[1]
OTHER_PROFILES = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml") if p.stem != "mini")


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """params.yaml and profiles/ of this checkout in a scratch folder, which is also the cwd."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_profiles_and_back_leave_params_yaml_byte_identical(repo_copy):
    params = repo_copy / "params.yaml"
    original = params.read_bytes()
    assert OTHER_PROFILES, "no profile besides mini to switch to"
    for name in OTHER_PROFILES:
        apply_profile(name, params, repo_copy / "profiles")
        assert params.read_bytes() != original
        # Every comment line survives: only values change.
        comments = [line for line in original.decode().splitlines() if line.lstrip().startswith("#")]
        assert [line for line in params.read_text().splitlines() if line.lstrip().startswith("#")] == comments
    apply_profile("mini", params, repo_copy / "profiles")
    assert params.read_text() == original.decode()  # (a text diff on failure)
    assert params.read_bytes() == original


def test_applied_values_equal_the_merged_profile(repo_copy):
    for name in OTHER_PROFILES:
        before = load_params(repo_copy / "params.yaml")
        returned = apply_profile(name, repo_copy / "params.yaml", repo_copy / "profiles")
        expected = deep_merge(before, load_profile(name, repo_copy / "profiles"))
        assert returned == expected
        assert load_params(repo_copy / "params.yaml") == expected


def test_mini_profile_is_params_yaml_as_written(repo_copy):
    """Applying mini to the default params.yaml changes nothing, and mini lists every key another
    profile sets that params.yaml has (else `apply mini` could not restore it)."""
    defaults, mini = leaves(load_params(REPO / "params.yaml")), leaves(load_profile("mini", REPO / "profiles"))
    for name in OTHER_PROFILES:
        for key in leaves(load_profile(name, REPO / "profiles")):
            assert key in mini or key not in defaults, f"profiles/mini.yaml lacks {'.'.join(key)} ({name} sets it)"
    for key, value in mini.items():
        assert defaults.get(key, "absent") == value, f"profiles/mini.yaml: {'.'.join(key)} differs from params.yaml"
    original = (repo_copy / "params.yaml").read_text()
    apply_profile("mini", repo_copy / "params.yaml", repo_copy / "profiles")
    assert (repo_copy / "params.yaml").read_text() == original  # same values, so only a layout difference fails here


def test_apply_splices_values_and_layout_switches_back(tmp_path):
    (tmp_path / "profiles").mkdir()
    params = tmp_path / "params.yaml"
    entries = "entries:\n        - {budget: high, n_objects: 96}\n        - {budget: low, n_objects: 96}"
    params.write_text("# header\nworld:\n  n_train: 400        # objects\n  categories: [chair, stool]\n"
                      f"render: {{size: 128, views: 4}}\n\ngenerate:\n  sets:\n    train:\n      {entries}\n"
                      "# trailing comment\njudges:\n  training:\n    steps: 450\n")
    (tmp_path / "profiles" / "tiny.yaml").write_text(
        "world:\n  n_train: 12\n  categories:\n    - chair\ngenerate: {sets: {train: {entries: [{budget: high}]}}}\n"
        "judges:\n  training: {refuse_degenerate: false}\n")
    (tmp_path / "profiles" / "mini.yaml").write_text(
        f"world:\n  n_train: 400\n  categories: [chair, stool]\ngenerate:\n  sets:\n    train:\n      {entries}\n")
    original = params.read_text()
    apply_profile("tiny", params, tmp_path / "profiles")
    assert params.read_text() == original.replace(
        "n_train: 400 ", "n_train: 12 ").replace(
        "categories: [chair, stool]", "categories:\n    - chair").replace(
        entries, "entries: [{budget: high}]") + "    refuse_degenerate: false\n"
    apply_profile("mini", params, tmp_path / "profiles")
    assert params.read_text() == original


def _shell_words(text: str) -> list[str]:
    """``text`` split into arguments as bash does it (quotes, line continuations)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_show_prints_overrides_dvc_applies_as_the_profile(repo_copy, capsys):
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    for name in OTHER_PROFILES:
        # Each profile against the committed params.yaml (the previous iteration applied its own).
        shutil.copy(REPO / "params.yaml", repo_copy / "params.yaml")
        assert cli.main(["profile", "show", name]) == 0
        words = _shell_words(capsys.readouterr().out)
        assert words[::2] == ["-S"] * (len(words) // 2)
        parsed = {tuple(o.key_or_group.split(".")): o.value() for o in to_hydra_overrides(words[1::2])}
        assert parsed == leaves(load_profile(name))
        # What `dvc exp run -S` writes (DVC's own writer) holds the values `profile apply` writes.
        shutil.copy(REPO / "params.yaml", repo_copy / "by_dvc.yaml")
        apply_overrides(repo_copy / "by_dvc.yaml", words[1::2])
        shutil.copy(REPO / "params.yaml", repo_copy / "params.yaml")
        assert yaml.safe_load((repo_copy / "by_dvc.yaml").read_text()) == apply_profile(name)


def test_run_passes_the_overrides_to_dvc_exp_run(repo_copy, monkeypatch):
    commands = []
    monkeypatch.setattr(cli.subprocess, "run",
                        lambda command: commands.append(command) or subprocess.CompletedProcess(command, 0))
    assert cli.main(["profile", "run", "paper", "--", "-n", "paper-try"]) == 0
    assert cli.main(["profile", "run", "paper", "--", "--queue"]) == 0
    first, queued = (c[c.index("exp"):] for c in commands)
    assert first[:3] == ["exp", "run", "--temp"] and first[-2:] == ["-n", "paper-try"]
    assert "render.size=504" in first and first[first.index("render.size=504") - 1] == "-S"
    assert "--temp" not in queued and queued[-1] == "--queue"
    assert (repo_copy / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()


def test_unknown_profile_key_is_an_error_that_names_it(repo_copy, capsys):
    (repo_copy / "profiles" / "typo.yaml").write_text("render:\n  szie: 504\n")
    before = (repo_copy / "params.yaml").read_bytes()
    with pytest.raises(ParamsError, match=r"unknown key\(s\) 'render.szie' \(did you mean 'render.size'\?\)"):
        apply_profile("typo")
    for action in ("apply", "show"):
        assert cli.main(["profile", action, "typo"]) == 2
        assert "profiles/typo.yaml: unknown key(s) 'render.szie'" in capsys.readouterr().err
    assert (repo_copy / "params.yaml").read_bytes() == before


def test_extends_merges_parents_first_and_refuses_a_cycle(repo_copy):
    profiles = repo_copy / "profiles"
    (profiles / "base1.yaml").write_text("render:\n  size: 96\njudge:\n  batch_size: 8\n")
    (profiles / "child.yaml").write_text("extends: base1\nrender:\n  size: 64\n")
    assert load_profile("child", profiles) == {"render": {"size": 64}, "judge": {"batch_size": 8}}
    params = repo_copy / "params.yaml"
    original = params.read_bytes()
    after = apply_profile("child", params, profiles)
    assert after["render"]["size"] == 64 and after["judge"]["batch_size"] == 8
    apply_profile("mini", params, profiles)
    assert params.read_bytes() == original
    (profiles / "base1.yaml").write_text("extends: child\nrender:\n  size: 96\n")
    with pytest.raises(ParamsError, match="extends itself"):
        load_profile("child", profiles)
