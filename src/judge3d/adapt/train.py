"""The arms' training loops and the params each arm reads.

An arm's settings are ``method`` (shared defaults) deep-merged with ``arms.<arm>`` (its overrides).
:func:`arm_spec` also returns the exact params keys the arm reads, which is what its dvc.yaml entry
must list so that ``dvc exp run -S method.beta=0.5`` reruns only the arms that read ``method.beta``.

Every random draw of step ``s`` (batch, t, noise, conditioning dropout, LoRA dropout) comes from a
generator seeded by ``(seed, arm, s)``, so a run resumed from a checkpoint is identical to an
uninterrupted one.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from judge3d.adapt import lora as lora_mod
from judge3d.adapt.data import FeaturePairs, TargetSet, split_indices, split_probe_objects
from judge3d.adapt.losses import dpo_loss, feature_mse, orpo_loss, sft_loss
from judge3d.adapt.probes import ProbeSet, eval_mode, feat_mse, fm_mse, is_diverged, make_probe_set
from judge3d.adapt.repair import ConditionRepair
from judge3d.core.config import ParamsError, deep_merge, require
from judge3d.generators.sampler import sample_logit_normal_t
from judge3d.core.io import read_jsonl
from judge3d.core.numerics import adamw
from judge3d.core.resume import checkpoint_dir, drop_checkpoints, fingerprint, replace_dir_atomically
from judge3d.core.seeding import derive_seed

KINDS = ("sft_best", "dpo", "orpo", "sft_clean", "repair")
SEVERITIES = ("mild", "medium", "severe")
ARM_FILE = "arm.json"
CHECKPOINT_EVERY = 10

# method.* keys each kind reads (beyond `seed` and its own `arms.<arm>` block).
_LORA_KEYS = ("train", "lora", "probe")
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "sft_best": _LORA_KEYS,
    "sft_clean": _LORA_KEYS,
    "dpo": _LORA_KEYS + ("beta", "reduction"),
    "orpo": _LORA_KEYS + ("orpo", "reduction"),
    "repair": ("repair", "probe"),
}
# DVC cannot splice a list into `params:`/`deps:`, so each foreach item carries a fixed number of
# slots (`${item.params[i]}`), padded by repeating the arm's own block (DVC accepts duplicates).
PARAM_SLOTS = 2 + max(len(v) for v in METHOD_KEYS.values())
DATA_DEP_SLOTS = 2
ARM_ONLY_KEYS = ("kind", "severity")

LogFn = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class ArmSpec:
    arm: str
    kind: str
    severity: str | None
    settings: dict[str, Any]        # effective values of the method keys this kind reads
    param_keys: list[str]           # what dvc.yaml must list for this arm

    def fingerprint(self) -> str:
        blob = json.dumps({"arm": self.arm, "kind": self.kind, "severity": self.severity,
                           "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def arm_spec(params: Mapping[str, Any], arm: str) -> ArmSpec:
    """Resolve ``arms.<arm>`` over ``method`` and validate; unknown override keys are an error."""
    arms = require(params, "arms", dict, hint="Add the arms block (see params.yaml).")
    if arm not in arms:
        raise ParamsError(f"params.yaml: no arm '{arm}' under 'arms' (known: {sorted(arms)})")
    block = require(params, f"arms.{arm}", dict)
    kind = require(params, f"arms.{arm}.kind", str, check=lambda k: k in KINDS,
                   hint=f"kind must be one of {list(KINDS)}.")
    method = require(params, "method", dict)
    wanted = METHOD_KEYS[kind]
    unknown = set(block) - set(wanted) - set(ARM_ONLY_KEYS)
    if unknown:
        raise ParamsError(f"params.yaml: arms.{arm} sets {sorted(unknown)}, which a '{kind}' arm does not read "
                          f"(it reads {list(ARM_ONLY_KEYS) + list(wanted)})")
    severity = None
    if kind in ("sft_clean", "repair"):
        severity = require(params, f"arms.{arm}.severity", str, check=lambda s: s in SEVERITIES,
                           hint=f"severity must be one of {list(SEVERITIES)}.")
    settings, keys = {}, ["seed", f"arms.{arm}"]
    for key in wanted:
        override = block.get(key)
        if key not in block or isinstance(override, Mapping):
            if key not in method:
                raise ParamsError(f"params.yaml: missing key 'method.{key}' (read by arm '{arm}')")
            keys.append(f"method.{key}")
            base = method[key]
            settings[key] = deep_merge(base, override) if isinstance(override, Mapping) else copy.deepcopy(base)
        else:
            settings[key] = copy.deepcopy(override)
    spec = ArmSpec(arm, kind, severity, settings, keys)
    _validate(spec)
    return spec


def _validate(spec: ArmSpec) -> None:
    s = {"method": spec.settings}  # lets `require` name keys as method.<key> (the arm may override them)
    pos = lambda v: v > 0  # noqa: E731
    hint = f"(arm '{spec.arm}': set it in method or arms.{spec.arm})"
    req = lambda key, kind, check=None: require(s, f"method.{key}", kind, check=check, hint=hint)  # noqa: E731
    if spec.kind == "repair":
        req("repair.hidden", int, pos)
        req("repair.lr", float, pos)
        req("repair.steps", int, pos)
        req("repair.batch", int, pos)
    else:
        req("train.lr", float, pos)
        req("train.steps", int, pos)
        req("train.batch", int, pos)
        req("train.grad_clip", float, pos)
        req("train.p_uncond", float, lambda v: 0 <= v < 1)
        req("lora.rank", int, pos)
        req("lora.alpha", float, pos)
        req("lora.dropout", float, lambda v: 0 <= v < 1)
        targets = req("lora.targets", list, lambda v: len(v) > 0 and all(isinstance(t, str) for t in v))
        spec.settings["lora"]["targets"] = list(targets)
    req("probe.n_objects", int, pos)
    req("probe.threshold", float, lambda v: v > 1)
    if spec.kind == "dpo":
        req("beta", float, lambda v: math.isfinite(v) and v > 0)
    if spec.kind in ("dpo", "orpo"):
        req("reduction", str, lambda v: v in ("mean", "sum"))
    if spec.kind == "orpo":
        req("orpo.lambda", float, lambda v: v >= 0)
        req("orpo.c", float, pos)


def dvc_entry_params(dvc_yaml: str | Path, arm: str, stage: str = "train-adapter") -> list[str] | None:
    """The params list of ``stage@arm`` in dvc.yaml (a foreach over a dict), or None if absent."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    entry = ((doc.get("stages") or {}).get(stage) or {}).get("foreach")
    if not isinstance(entry, Mapping) or arm not in entry:
        return None
    item = entry[arm]
    return list(item.get("params", [])) if isinstance(item, Mapping) else None


def check_dvc_params(spec: ArmSpec, dvc_yaml: str | Path = "dvc.yaml") -> None:
    """Refuse to train when dvc.yaml's entry misses a key the arm reads (its result would go stale)."""
    listed = dvc_entry_params(dvc_yaml, spec.arm)
    if listed is None:
        return
    missing = [k for k in spec.param_keys if k not in listed]
    if missing:
        raise ParamsError(f"dvc.yaml: train-adapter@{spec.arm} must list params {missing} (the arm reads them); "
                          f"print the full list with `python stages/train_adapter.py --arm {spec.arm} --print-params`")


# ---------------------------------------------------------------------------------------------
# Checkpoints (resumable loops)
# ---------------------------------------------------------------------------------------------
def _save_ckpt(ckpt: Path, tensors: dict[str, torch.Tensor], opt, step: int, history: list, fingerprint: str) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "history": history}))
    replace_dir_atomically(tmp, ckpt)


def _load_ckpt(ckpt: Path, module: torch.nn.Module, opt, fingerprint: str) -> tuple[int, list]:
    """Resume when a checkpoint of the same settings exists; a stale one is discarded."""
    if not (ckpt / "state.pt").is_file():
        return 0, []
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("fingerprint") != fingerprint:
        shutil.rmtree(ckpt, ignore_errors=True)
        return 0, []
    module.load_state_dict(load_file(str(ckpt / "trainable.safetensors")), strict=False)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), list(meta["history"])


def _run_checkpoint(out_dir: Path, spec: ArmSpec, *tensors: torch.Tensor | None,
                    module: torch.nn.Module | None = None) -> tuple[Path, str]:
    """This run's checkpoint folder and fingerprint: the arm's settings, its training tensors and the
    weights it starts from. The folder lives outside the DVC output (:mod:`judge3d.core.resume`), so a
    checkpoint of other data or another base is never resumed."""
    digests = [hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
               for t in tensors if t is not None]
    if module is not None:
        digests += [hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                    for _, v in sorted(module.state_dict().items())]
    run_fp = fingerprint(spec.fingerprint(), digests)
    return checkpoint_dir(out_dir, run_fp), run_fp


def _replay(history: list[dict[str, float]], log_step: LogFn | None) -> None:
    """Log a resumed run's earlier steps again: DVC deleted the curve with the stage's outputs."""
    if log_step is not None:
        for step, logs in enumerate(history):
            log_step(step, logs)


def _trainable_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


# ---------------------------------------------------------------------------------------------
# LoRA arms
# ---------------------------------------------------------------------------------------------
def _step_generator(seed: int, arm: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "train-adapter", arm, step))


def lora_step_loss(generator, kind: str, data: TargetSet, idx: torch.Tensor, settings: Mapping[str, Any],
                   g: torch.Generator):
    """One batch's loss and log figures; ``None`` loss when the errors are non-finite (divergence)."""
    dev = generator.device
    cond = generator.drop_cond(data.cond[idx].to(dev), p=settings["train"]["p_uncond"], generator=g)
    x_w = data.x_w[idx].to(dev)
    if kind in ("sft_best", "sft_clean"):
        e = generator.flow_errors(x_w, cond, reduction="mean", generator=g)
        if not torch.isfinite(e).all():
            return None, {}
        loss = sft_loss(e)
        return loss, {"loss": float(loss.detach()), "fm_mse": float(e.detach().mean())}

    # Preference arms: one t and one noise per pair, shared by winner and loser, policy and reference.
    b = len(idx)
    t = sample_logit_normal_t(b, generator.t_mean, generator.t_std, generator=g)
    noise = torch.randn((b, *generator.latent_shape), generator=g)
    x = torch.cat([x_w, data.x_l[idx].to(dev)])
    t2, n2, c2 = torch.cat([t, t]).to(dev), torch.cat([noise, noise]).to(dev), torch.cat([cond, cond])
    red = settings["reduction"]
    e_w, e_l = generator.flow_errors(x, c2, t=t2, noise=n2, reduction=red).chunk(2)
    if not (torch.isfinite(e_w).all() and torch.isfinite(e_l).all()):
        return None, {}
    if kind == "orpo":
        terms = orpo_loss(e_w, e_l, lam=settings["orpo"]["lambda"], c=settings["orpo"]["c"])
        return terms.loss, {**terms.log_dict(), "e_w": float(e_w.detach().mean()), "e_l": float(e_l.detach().mean())}
    with torch.no_grad(), lora_mod.reference(generator.flow_model):
        e_w_ref, e_l_ref = generator.flow_errors(x, c2, t=t2, noise=n2, reduction=red).chunk(2)
    terms = dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=settings["beta"])
    return terms.loss, {**terms.log_dict(), "e_w": float(e_w.detach().mean()), "e_l": float(e_l.detach().mean()),
                        "e_w_ref": float(e_w_ref.mean()), "e_l_ref": float(e_l_ref.mean())}


@torch.no_grad()
def probe_preference(generator, probe_w: ProbeSet, x_l: torch.Tensor, beta: float | None) -> dict[str, float]:
    """Implicit accuracy and margins on held-out probe pairs (fixed t and noise), policy vs base."""
    dev = generator.device
    x = torch.cat([probe_w.x0, x_l]).to(dev)
    t = torch.cat([probe_w.t, probe_w.t]).to(dev)
    noise = torch.cat([probe_w.noise, probe_w.noise]).to(dev)
    cond = torch.cat([probe_w.cond, probe_w.cond]).to(dev)
    with eval_mode(generator.flow_model):
        e_w, e_l = generator.flow_errors(x, cond, t=t, noise=noise, reduction="mean").chunk(2)
        with lora_mod.reference(generator.flow_model):
            r_w, r_l = generator.flow_errors(x, cond, t=t, noise=noise, reduction="mean").chunk(2)
    delta = (e_w - r_w) - (e_l - r_l)          # < 0: the policy moved towards the winner
    out = {"implicit_accuracy": float((delta < 0).float().mean()),
           "probe_delta_err_w": float((e_w - r_w).mean()), "probe_delta_err_l": float((e_l - r_l).mean())}
    if beta is not None:
        out["probe_margin"] = float((-(beta / 2.0) * delta).mean())
    return out


def train_lora_arm(generator, spec: ArmSpec, data: TargetSet, seed: int, out_dir: Path,
                   log_step: LogFn | None = None) -> dict[str, Any]:
    """Train one LoRA arm on ``generator`` (its flow model gets wrapped); save the adapter in ``out_dir``."""
    s = spec.settings
    train_ids, probe_ids = split_probe_objects(data.object_ids, s["probe"]["n_objects"], seed)
    tr_idx, pr_idx = split_indices(data.object_ids, probe_ids)
    train, held = data.subset(tr_idx), data.subset(pr_idx)
    # The pair arms (sft_best, dpo, orpo) share one probe set: same objects, same t and noise.
    cond_kind = "degraded-cond" if spec.kind == "sft_clean" else "clean-cond"
    probe = make_probe_set(held.x_w, held.cond, derive_seed(seed, "arms", "probe", cond_kind),
                           generator.t_mean, generator.t_std)

    lo = s["lora"]
    torch.manual_seed(derive_seed(seed, "train-adapter", spec.arm, "init"))  # peft draws lora_A from it
    generator.flow_model = lora_mod.add_lora(generator.flow_model, lo["rank"], lo["alpha"], lo["dropout"],
                                             lo["targets"])
    model = generator.flow_model
    with lora_mod.reference(model):
        before = fm_mse(generator, probe)
    params = lora_mod.trainable_parameters(model)
    tr = s["train"]
    opt = adamw(params, lr=tr["lr"], weight_decay=0.0)
    ckpt, run_fp = _run_checkpoint(out_dir, spec, data.cond, data.x_w, data.x_l, module=model)
    start, history = _load_ckpt(ckpt, model, opt, run_fp)
    _replay(history, log_step)

    t0 = time.time()
    nonfinite_step = None
    n = len(train)
    bar = tqdm(range(start, tr["steps"]), desc=f"train-adapter@{spec.arm}", initial=start, total=tr["steps"])
    for step in bar:
        g = _step_generator(seed, spec.arm, step)
        torch.manual_seed(derive_seed(seed, spec.arm, step, "dropout"))  # LoRA dropout masks
        idx = torch.randperm(n, generator=g)[: tr["batch"]]
        loss, logs = lora_step_loss(generator, spec.kind, train, idx, s, g)
        if loss is None:
            nonfinite_step = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tr["grad_clip"])
        opt.step()
        logs["grad_norm"] = float(grad_norm)
        history.append(logs)
        if log_step is not None:
            log_step(step, logs)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < tr["steps"]:
            _save_ckpt(ckpt, _trainable_tensors(model), opt, step + 1, history, run_fp)
    train_s = time.time() - t0

    after = fm_mse(generator, probe)
    metrics: dict[str, Any] = {
        "fm_mse_before": before, "fm_mse_after": after,
        "probe_ratio": after / before if math.isfinite(after) else None,
        "diverged": is_diverged(before, after, s["probe"]["threshold"]) or nonfinite_step is not None,
        "nonfinite_at_step": nonfinite_step, "probe_threshold": s["probe"]["threshold"],
        "n_train": len(train), "n_probe": len(held), "train_s": train_s, "resumed_from_step": start,
        "probe_set": ("held-out objects: degraded-input cond -> clean high-budget target" if spec.kind == "sft_clean"
                      else "held-out objects: clean-input cond -> judge winner"),
    }
    if held.x_l is not None and math.isfinite(after):
        metrics.update(probe_preference(generator, probe, held.x_l, s.get("beta")))
    metrics.update(_tail_means(history))
    lora_mod.save_adapter(model, out_dir)
    drop_checkpoints(out_dir)
    return metrics


def _tail_means(history: list[dict[str, float]], k: int = 10) -> dict[str, float]:
    """Training figures averaged over the last ``k`` steps (a single step is too noisy to report)."""
    if not history:
        return {}
    tail = history[-k:]
    keys = sorted(set().union(*tail))
    return {f"train_{key}_last{k}": sum(h[key] for h in tail if key in h) / sum(key in h for h in tail)
            for key in keys}


# ---------------------------------------------------------------------------------------------
# Conditioner repair
# ---------------------------------------------------------------------------------------------
def train_repair_arm(spec: ArmSpec, data: FeaturePairs, seed: int, out_dir: Path,
                     log_step: LogFn | None = None) -> dict[str, Any]:
    """Fit the zero-init residual adapter from degraded to clean tokens (flow model untouched)."""
    s = spec.settings
    rp = s["repair"]
    _, probe_ids = split_probe_objects(data.object_ids, s["probe"]["n_objects"], seed)
    tr_idx, pr_idx = split_indices(data.object_ids, probe_ids)
    train, held = data.subset(tr_idx), data.subset(pr_idx)

    torch.manual_seed(derive_seed(seed, "train-adapter", spec.arm, "init"))
    repair = ConditionRepair(train.degraded.shape[-1], rp["hidden"])
    before = feat_mse(None, held.degraded, held.clean)
    opt = adamw(repair.parameters(), lr=rp["lr"], weight_decay=0.0)
    ckpt, run_fp = _run_checkpoint(out_dir, spec, data.degraded, data.clean, module=repair)
    start, history = _load_ckpt(ckpt, repair, opt, run_fp)
    _replay(history, log_step)
    t0 = time.time()
    n = len(train)
    repair.train()
    for step in tqdm(range(start, rp["steps"]), desc=f"train-adapter@{spec.arm}", initial=start, total=rp["steps"]):
        g = _step_generator(seed, spec.arm, step)
        idx = torch.randperm(n, generator=g)[: rp["batch"]]
        loss = feature_mse(repair(train.degraded[idx]), train.clean[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logs = {"loss": float(loss.detach())}
        history.append(logs)
        if log_step is not None:
            log_step(step, logs)
        if (step + 1) % (CHECKPOINT_EVERY * 10) == 0 and step + 1 < rp["steps"]:
            _save_ckpt(ckpt, repair.state_dict(), opt, step + 1, history, run_fp)
    after = feat_mse(repair, held.degraded, held.clean)
    repair.eval()
    repair.save(out_dir)
    drop_checkpoints(out_dir)
    return {"feat_mse_before": before, "feat_mse_after": after,
            "feat_ratio": after / before if math.isfinite(after) else None,
            "diverged": is_diverged(before, after, s["probe"]["threshold"]),
            "probe_threshold": s["probe"]["threshold"], "n_train": len(train), "n_probe": len(held),
            "train_s": time.time() - t0, "resumed_from_step": start,
            "probe_set": "held-out train-split objects: degraded tokens vs clean tokens",
            **_tail_means(history)}


def write_arm_file(out_dir: Path, spec: ArmSpec) -> None:
    (out_dir / ARM_FILE).write_text(json.dumps({"arm": spec.arm, "kind": spec.kind, "severity": spec.severity,
                                                "settings": spec.settings}, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# One arm, end to end
# ---------------------------------------------------------------------------------------------
@dataclass
class ArmPaths:
    base: str = "models/base"
    world: str = "data/world/manifest.jsonl"
    pairs: str = "data/labels/train_pairs.jsonl"
    generated: str = "data/generated/train/manifest.jsonl"
    degraded_dir: str = "data/degraded"          # <degraded_dir>/<severity>/manifest.jsonl

    def degraded(self, severity: str) -> str:
        return f"{self.degraded_dir}/{severity}/manifest.jsonl"


CODE_FOLDERS = ("src/judge3d/adapt", "src/judge3d/generators")


def code_deps(repo: str | Path = ".") -> tuple[str, ...]:
    """The code the train-adapter stage runs: its script's whole import closure (``judge3d.pipeline.dvcgen``),
    with the two packages it is mostly made of listed as folders."""
    from judge3d.pipeline.dvcgen import import_closure

    files = sorted(p.as_posix() for p in import_closure("stages/train_adapter.py", repo))
    rest = [f for f in files if not any(f.startswith(folder + "/") for folder in CODE_FOLDERS)]
    return (*CODE_FOLDERS, *rest)


def arm_deps(spec: ArmSpec, paths: ArmPaths | None = None) -> list[str]:
    """The files an arm reads: its dvc.yaml ``deps`` (severity-specific, so editing `severe` reruns only
    the arms that read severe inputs)."""
    paths = paths or ArmPaths()
    world_dir = str(Path(paths.world).parent)
    data = [paths.base, world_dir]
    if spec.kind in ("sft_best", "dpo", "orpo"):
        data += [paths.pairs, str(Path(paths.generated).parent)]
    elif spec.kind == "sft_clean":
        data += [f"{paths.degraded_dir}/{spec.severity}", str(Path(paths.generated).parent)]
    else:
        data += [f"{paths.degraded_dir}/{spec.severity}"]
    return list(code_deps()) + data


def dvc_foreach(params: Mapping[str, Any], paths: ArmPaths | None = None) -> dict[str, dict[str, list[str]]]:
    """The ``foreach`` dict of the train-adapter stage: per arm, the params keys it reads
    (``PARAM_SLOTS`` of them, padded with ``arms.<arm>``) and its data deps (``DATA_DEP_SLOTS``,
    padded with the base model); the code deps, base and world are the same for every arm."""
    out = {}
    for arm in require(params, "arms", dict):
        spec = arm_spec(params, arm)
        keys = spec.param_keys + [f"arms.{arm}"] * (PARAM_SLOTS - len(spec.param_keys))
        data = arm_deps(spec, paths)[len(code_deps()) + 2:]
        data += [(paths or ArmPaths()).base] * (DATA_DEP_SLOTS - len(data))
        out[arm] = {"params": keys, "deps": data}
    return out


def dvc_stanza(params: Mapping[str, Any], paths: ArmPaths | None = None) -> str:
    """The whole ``train-adapter`` stage for dvc.yaml (foreach items + a slot-indexed template)."""
    paths = paths or ArmPaths()
    body = yaml.safe_dump({"train-adapter": {"foreach": dvc_foreach(params, paths)}}, sort_keys=False)
    p_lines = "".join(f"      - ${{item.params[{i}]}}\n" for i in range(PARAM_SLOTS))
    fixed = "".join(f"      - {d}\n" for d in (*code_deps(), paths.base, str(Path(paths.world).parent)))
    d_lines = "".join(f"      - ${{item.deps[{i}]}}\n" for i in range(DATA_DEP_SLOTS))
    return (body + "  do:\n"
            "    cmd: python stages/train_adapter.py --arm ${key}\n"
            "    params:\n" + p_lines +
            "    deps:\n" + fixed + d_lines +
            "    outs:\n"
            "      - models/arms/${key}\n"
            "      - data/arms/${key}/train_metrics.json\n"
            "      - dvclive/train_adapter/${key}\n")


def untrained_lora_arm(generator, spec: ArmSpec, seed: int, out_dir: Path, t0: float, reason: str) -> dict[str, Any]:
    """A LoRA arm with no training data: the adapter at init (output bit-identical to the base), flagged."""
    lo = spec.settings["lora"]
    torch.manual_seed(derive_seed(seed, "train-adapter", spec.arm, "init"))  # peft draws lora_A from it
    generator.flow_model = lora_mod.add_lora(generator.flow_model, lo["rank"], lo["alpha"], lo["dropout"],
                                             lo["targets"])
    lora_mod.save_adapter(generator.flow_model, out_dir)
    write_arm_file(out_dir, spec)
    print(f"WARNING: train-adapter@{spec.arm} NOT trained: {reason}")
    metrics: dict[str, Any] = {"trained": False, "untrained_reason": reason, "n_train": 0, "diverged": False,
                               "fm_mse_before": None, "fm_mse_after": None}
    if spec.kind == "dpo":
        metrics["beta"] = spec.settings["beta"]
    metrics.update({"arm": spec.arm, "kind": spec.kind, "severity": spec.severity, "wall_s": time.time() - t0,
                    "settings": spec.settings})
    return metrics


def run_arm(params: Mapping[str, Any], arm: str, out_dir: str | Path, paths: ArmPaths | None = None,
            log_step: LogFn | None = None, device: str = "cpu") -> dict[str, Any]:
    """Load the base, the arm's data, train, save the adapter + arm.json; return the metrics."""
    from judge3d.adapt import data as D
    from judge3d.generators import load_generator

    paths = paths or ArmPaths()
    spec = arm_spec(params, arm)
    seed = require(params, "seed", int)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    generator = load_generator(paths.base, device=device)
    train_ids = D.split_object_ids(paths.world, "train")
    if spec.kind == "repair":
        data = D.load_feature_pairs(generator, paths.degraded(spec.severity), train_ids)
        load_s = time.time() - t0
        metrics = train_repair_arm(spec, data, seed, out_dir, log_step)
    else:
        try:
            if spec.kind == "sft_clean":
                data = D.load_clean_targets(generator, paths.degraded(spec.severity), paths.generated, train_ids)
            elif not read_jsonl(paths.pairs):
                raise D.NoTrainingData(f"no swap-consistent training pairs in {paths.pairs}")
            else:
                data = D.load_pairs(generator, paths.pairs, paths.generated, paths.world)
        except D.NoTrainingData as exc:
            # Nothing to adapt on: the arm is saved as LoRA at init (the base, exactly) and flagged
            # untrained, so the report says so instead of showing a result.
            return untrained_lora_arm(generator, spec, seed, out_dir, t0, str(exc))
        if spec.kind != "sft_clean":
            leaked = sorted(set(data.object_ids) - train_ids)
            if leaked:
                raise ValueError(f"{paths.pairs}: pairs on non-train objects {leaked[:5]}...; "
                                 f"adaptation must use the train split only")
        load_s = time.time() - t0
        metrics = train_lora_arm(generator, spec, data, seed, out_dir, log_step)
        metrics.update({"skipped": data.skipped, "empty_targets": data.empty_targets})
    write_arm_file(out_dir, spec)
    if spec.kind == "dpo":
        metrics["beta"] = spec.settings["beta"]
    metrics.update({"arm": arm, "kind": spec.kind, "severity": spec.severity, "load_s": load_s,
                    "wall_s": time.time() - t0, "settings": spec.settings})
    return metrics
