"""The `judge3d` command: reviewer and profile utilities (stages have their own CLIs in stages/)."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from judge3d.core.config import PARAMS_FILE, ParamsError, load_params
from judge3d.core.profiles import apply_profile, set_param_args


def _show_args(args: list[str]) -> str:
    """``-S key=value`` pairs, shell-quoted, one pair a line (joined by line continuations)."""
    return " \\\n".join(f"{flag} {shlex.quote(value)}" for flag, value in zip(args[::2], args[1::2]))


def _run_profile(name: str, dvc_args: list[str]) -> int:
    """``dvc exp run`` with the profile's ``-S`` overrides; an experiment that leaves params.yaml be.

    ``--temp`` unless ``--queue`` is given: a workspace run would leave DVC's re-dump of
    params.yaml behind (to run in the workspace, apply the profile and run ``dvc exp run``).
    """
    if dvc_args[:1] == ["--"]:
        dvc_args = dvc_args[1:]
    where = [] if {"--temp", "--queue"} & set(dvc_args) else ["--temp"]
    command = [sys.executable, "-m", "dvc", "exp", "run", *where, *set_param_args(name), *dvc_args]
    print("+ dvc " + shlex.join(command[3:]), flush=True)
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="judge3d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="a parameter profile: apply it to params.yaml, show or run it as "
                                          "`dvc exp run -S` overrides (mini is the default params.yaml)")
    prof.add_argument("action", choices=["apply", "show", "run"],
                      help="apply: set its values in params.yaml (other lines untouched; `apply mini` undoes "
                           "any profile); show: print its `-S key=value` arguments; run: `dvc exp run --temp` "
                           "with them")
    prof.add_argument("name", help="profile name: a file profiles/<name>.yaml (mini, tiny, paper)")
    prof.add_argument("dvc_args", nargs=argparse.REMAINDER, help="run: more `dvc exp run` arguments (after --)")
    ver = sub.add_parser("verify", help="recompute every number in metrics/ from the raw verdict logs and manifests")
    ver.add_argument("--root", default=".", help="repository root")
    deps = sub.add_parser("dvc-deps", help="list (or --write) project modules a stage imports but dvc.yaml does not list")
    deps.add_argument("--write", action="store_true", help="add them to dvc.yaml (comments kept) and regenerate the arm stages")
    deps.add_argument("--dvc-yaml", default="dvc.yaml")
    args = parser.parse_args(argv)

    try:
        if args.command == "profile":
            if args.dvc_args and args.action != "run":
                parser.error(f"profile {args.action} takes no further arguments: {args.dvc_args}")
            if args.action == "show":
                print(_show_args(set_param_args(args.name)))
                return 0
            if args.action == "run":
                return _run_profile(args.name, args.dvc_args)
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
            from judge3d.pipeline.dvcgen import (extra_code_deps, missing_code_deps, remove_extra_code_deps,
                                                 write_arm_stanzas, write_missing_code_deps)

            if args.write:
                params = load_params(Path(args.dvc_yaml).parent / PARAMS_FILE)
                for stage in write_arm_stanzas(args.dvc_yaml, params):
                    print(f"{stage}: regenerated from the arm registry")
            missing = write_missing_code_deps(args.dvc_yaml) if args.write else missing_code_deps(args.dvc_yaml)
            extra = remove_extra_code_deps(args.dvc_yaml) if args.write else extra_code_deps(args.dvc_yaml)
            for stage, files in missing.items():
                print(f"{stage}: {'added' if args.write else 'missing'} {' '.join(files)}")
            for stage, files in extra.items():
                print(f"{stage}: {'removed' if args.write else 'not imported'} {' '.join(files)}")
            if not missing and not extra:
                print(f"dvc-deps: every stage lists exactly the project modules it imports ({args.dvc_yaml})")
            return 1 if (missing or extra) and not args.write else 0
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
