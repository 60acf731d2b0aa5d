"""The `judge3d` command: reviewer and profile utilities (stages have their own CLIs in stages/)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from judge3d.core.config import PARAMS_FILE, ParamsError, check_known_keys, deep_merge, load_params, load_yaml

PROFILES_DIR = Path("profiles")


def apply_profile(name: str, params_path: str | Path = PARAMS_FILE, profiles_dir: str | Path = PROFILES_DIR) -> dict:
    """Merge ``profiles/<name>.yaml`` into params.yaml (in place) and return the merged params."""
    profile_path = Path(profiles_dir) / f"{name}.yaml"
    if not profile_path.is_file():
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        raise ParamsError(f"profile '{name}' not found at {profile_path}; known profiles: {known}")
    # Same checks as params.yaml: a repeated or unknown key in a profile would be merged in silently.
    override = load_yaml(profile_path) or {}
    check_known_keys(override, str(profile_path))
    merged = deep_merge(load_params(params_path), override)
    Path(params_path).write_text(
        f"# params.yaml with profile '{name}' applied (judge3d profile apply {name}).\n"
        + yaml.safe_dump(merged, sort_keys=False, default_flow_style=None)
    )
    return merged


def _regenerate_train_adapter(dvc_yaml: Path) -> None:
    """Rewrite the generated ``train-adapter`` stage of dvc.yaml from params and the code's closure."""
    import re

    from judge3d.adapt.train import dvc_stanza

    text = dvc_yaml.read_text()
    start = text.index("\n  train-adapter:\n") + 1
    nxt = re.compile(r"^  [A-Za-z0-9_-]+:\n", re.M).search(text, start + 1)
    end = nxt.start() if nxt else len(text)
    stanza = "".join("  " + line if line.strip() else line
                     for line in dvc_stanza(load_params(dvc_yaml.parent / PARAMS_FILE)).splitlines(True))
    dvc_yaml.write_text(text[:start] + stanza + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="judge3d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="apply a parameter profile (mini is the default params.yaml)")
    prof.add_argument("action", choices=["apply"])
    prof.add_argument("name", help="profile name: a file profiles/<name>.yaml (tiny, paper)")
    ver = sub.add_parser("verify", help="recompute every number in metrics/ from the raw verdict logs and manifests")
    ver.add_argument("--root", default=".", help="repository root")
    deps = sub.add_parser("dvc-deps", help="list (or --write) project modules a stage imports but dvc.yaml does not list")
    deps.add_argument("--write", action="store_true", help="add them to dvc.yaml (comments kept)")
    deps.add_argument("--dvc-yaml", default="dvc.yaml")
    args = parser.parse_args(argv)

    try:
        if args.command == "profile":
            apply_profile(args.name)
            print(f"applied profile '{args.name}' to {PARAMS_FILE}")
            return 0
        if args.command == "verify":
            from judge3d.pipeline.verify import verify_repo

            mismatches = verify_repo(Path(args.root))
            for line in mismatches:
                print(f"MISMATCH {line}")
            if mismatches:
                print(f"verify: {len(mismatches)} mismatch(es)")
                return 1
            print("verify: every number in metrics/ matches the raw logs")
            return 0
        if args.command == "dvc-deps":
            from judge3d.pipeline.dvcgen import missing_code_deps, write_missing_code_deps

            if args.write:
                _regenerate_train_adapter(Path(args.dvc_yaml))
            missing = write_missing_code_deps(args.dvc_yaml) if args.write else missing_code_deps(args.dvc_yaml)
            for stage, files in missing.items():
                print(f"{stage}: {'added' if args.write else 'missing'} {' '.join(files)}")
            if not missing:
                print(f"dvc-deps: every stage lists every project module it imports ({args.dvc_yaml})")
            return 1 if missing and not args.write else 0
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
