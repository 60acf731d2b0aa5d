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


def _serve(args: argparse.Namespace) -> int:
    """``judge3d serve``: check the bind before loading the model, load it as the pipeline does, serve."""
    from judge3d.judges import serve as srv
    from judge3d.judges.hf import HFJudge, JudgeLoadError

    try:
        token = srv.resolve_token(args.host, args.token)
    except srv.ServeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # the loader behind judge3d.pipeline.judging.load_judge, with the judge.* params as flags
        judge = HFJudge.load(args.model_dir, dtype=args.dtype, device=args.device,
                             attn_implementation=args.attn_implementation, batch_size=args.batch_size, name=args.name)
    except JudgeLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_id = judge.judge_id.rsplit("@", 1)[0]
    limits = {k: v for k, v in (("max_image_bytes", args.max_image_bytes), ("max_pixels", args.max_pixels))
              if v is not None}
    print(f"serving {judge.judge_id} on http://{args.host}:{args.port}/v1"
          + (" (bearer token required)" if token else ""), flush=True)
    srv.serve(judge, host=args.host, port=args.port, token=token, model_id=model_id,
              revision=judge.weights_hash, **limits)
    return 0


def _exp_table(args: argparse.Namespace) -> int:
    """``judge3d exp-table``: the sweep's table on stdout, unreadable metrics files as warnings on stderr."""
    import json

    from judge3d.report.experiments import ExperimentsError, table_from_dvc

    try:
        exp_show = json.loads(Path(args.json).read_text()) if args.json else None
        table, warnings = table_from_dvc(args.sweep, Path.cwd(), exp_show, args.all_commits, args.param)
    except (ExperimentsError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(table.markdown() if args.format == "md" else table.csv(), end="")
    return 0


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
    srv = sub.add_parser("serve", help="serve a judge model dir as an OpenAI-compatible endpoint "
                                       "(POST /v1/chat/completions, GET /v1/models)")
    srv.add_argument("model_dir", help="the judge: a saved HF model dir or hub id, as judges.*.model in params.yaml")
    srv.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --token")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--token", default=None, help="bearer token every request must carry (default: "
                                                   "$JUDGE3D_SERVE_TOKEN; none on loopback)")
    srv.add_argument("--dtype", default="float32")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--attn-implementation", default="sdpa")
    srv.add_argument("--batch-size", type=int, default=16)
    srv.add_argument("--name", default=None, help="served model id (default: MODEL_DIR as given, the in-process "
                                                  "judge's name, so both backends get the same judge_id)")
    srv.add_argument("--max-image-bytes", type=int, default=None)
    srv.add_argument("--max-pixels", type=int, default=None)
    ext = sub.add_parser("exp-table", help="a sweep's table from DVC experiments (`dvc exp show`): beta (one row "
                                           "per DPO β), seeds (each headline number's spread over train_seed) or "
                                           "reference (the reference-aware eval judge beside the reference-free one)")
    ext.add_argument("sweep", metavar="beta|seeds|reference", help="the sweep (judge3d.report.experiments.SWEEPS)")
    ext.add_argument("--json", default=None, metavar="FILE", help="saved `dvc exp show --json` output "
                                                                  "(default: run it here)")
    ext.add_argument("--format", choices=["md", "csv"], default="md")
    ext.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only the "
                                                                "newest's (`dvc exp show --all-commits`)")
    ext.add_argument("--param", default=None, help="the swept param, if not the sweep's own (method.beta, train_seed, "
                                                              "judges.eval.reference)")
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
        if args.command == "serve":
            return _serve(args)
        if args.command == "exp-table":
            return _exp_table(args)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
