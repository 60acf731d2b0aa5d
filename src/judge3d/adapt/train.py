"""The arms' training loops (each arm's spec and settings: :mod:`judge3d.adapt.arms`).

Every random draw of step ``s`` (batch, t, noise, conditioning dropout, LoRA dropout) comes from a
generator seeded by ``(seed, arm, s)``, so a run resumed from a checkpoint is identical to an
uninterrupted one. The loop itself (constant LR, checkpoints every ``method.train.checkpoint_every``
or ``method.repair.checkpoint_every`` steps, dvclive curve, the after-probe) is
:mod:`judge3d.core.training`'s.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from judge3d.adapt import lora as lora_mod
from judge3d.adapt.arms import DEFAULT_LORA_STAGE, ArmInputs, ArmSpec, arm_spec
from judge3d.adapt.data import FeaturePairs, TargetSet, split_indices, split_probe_objects
from judge3d.adapt.losses import dpo_loss, feature_mse, orpo_loss, sft_loss
from judge3d.adapt.probes import ProbeSet, eval_mode, feat_mse, fm_mse, is_diverged, make_probe_set
from judge3d.adapt.repair import ConditionRepair
from judge3d.core.config import require
from judge3d.generators.sampler import sample_logit_normal_t
from judge3d.generators.stages import Latent, SparseLatent, latents_to, select_latents
from judge3d.core.io import read_jsonl
from judge3d.core.numerics import adamw
from judge3d.core.resume import checkpoint_dir, drop_checkpoints, fingerprint
from judge3d.core.seeding import derive_seed
from judge3d.core.training import Checkpointing, Probe, constant_schedule, train as train_loop

ARM_FILE = "arm.json"


# ---------------------------------------------------------------------------------------------
# Checkpoints (resumable loops)
# ---------------------------------------------------------------------------------------------
def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _latents_digest(latents: Latent) -> str:
    """A dense tensor's bytes, or a sparse latent's coords and feats (its layout is part of the data)."""
    if isinstance(latents, SparseLatent):
        return _tensor_digest(latents.coords) + _tensor_digest(latents.feats)
    return _tensor_digest(latents)


def _run_checkpoint(out_dir: Path, spec: ArmSpec, every: int, *latents: Latent | None,
                    module: torch.nn.Module | None = None) -> Checkpointing:
    """This run's checkpoint, keyed by the arm's settings, its training latents and the weights it
    starts from. The folder lives outside the DVC output (:mod:`judge3d.core.resume`), so a
    checkpoint of other data or another base is never resumed."""
    digests = [_latents_digest(x) for x in latents if x is not None]
    if module is not None:
        digests += [_tensor_digest(v) for _, v in sorted(module.state_dict().items())]
    run_fp = fingerprint(spec.fingerprint(), digests)
    return Checkpointing(checkpoint_dir(out_dir, run_fp), run_fp, every)


def _checkpoint_every(spec: ArmSpec, block: str) -> int:
    return require({"method": spec.settings}, f"method.{block}.checkpoint_every", int, check=lambda v: v > 0,
                   hint=f"(arm '{spec.arm}': set it in method or arms.{spec.arm})")


# ---------------------------------------------------------------------------------------------
# LoRA arms
# ---------------------------------------------------------------------------------------------
def _step_generator(seed: int, arm: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "train-adapter", arm, step))


def lora_step_loss(generator, kind: str, data: TargetSet, idx: torch.Tensor, settings: Mapping[str, Any],
                   g: torch.Generator):
    """One batch's loss and log figures; ``None`` loss when the errors are non-finite (divergence)."""
    dev = generator.device
    stage = generator.stage(settings["lora"].get("stage", DEFAULT_LORA_STAGE))
    cond = generator.drop_cond(data.cond[idx].to(dev), p=settings["train"]["p_uncond"], generator=g)
    x_w = latents_to(select_latents(data.x_w, idx), dev)
    if kind in ("sft_best", "sft_clean"):
        e = stage.flow_errors(x_w, cond, reduction="mean", generator=g)
        if not torch.isfinite(e).all():
            return None, {}
        loss = sft_loss(e)
        return loss, {"loss": float(loss.detach()), "fm_mse": float(e.detach().mean())}

    # Preference arms: one t and one noise per pair, shared by winner and loser, policy and reference.
    b = len(idx)
    t = sample_logit_normal_t(b, stage.t_mean, stage.t_std, generator=g)
    # One noise seed per pair: winner and loser get the same noise field (read at their own coords, sparse).
    noise_seeds = torch.randint(0, 2**31 - 1, (b,), generator=g).tolist()
    x = stage.cat([x_w, latents_to(select_latents(data.x_l, idx), dev)])
    t2, c2 = torch.cat([t, t]).to(dev), torch.cat([cond, cond])
    n2 = latents_to(stage.noise_like(x, noise_seeds * 2), dev)
    red = settings["reduction"]
    e_w, e_l = stage.flow_errors(x, c2, t=t2, noise=n2, reduction=red).chunk(2)
    if not (torch.isfinite(e_w).all() and torch.isfinite(e_l).all()):
        return None, {}
    if kind == "orpo":
        terms = orpo_loss(e_w, e_l, lam=settings["orpo"]["lambda"], c=settings["orpo"]["c"])
        return terms.loss, {**terms.log_dict(), "e_w": float(e_w.detach().mean()), "e_l": float(e_l.detach().mean())}
    with torch.no_grad(), lora_mod.reference(stage.flow_model):
        e_w_ref, e_l_ref = stage.flow_errors(x, c2, t=t2, noise=n2, reduction=red).chunk(2)
    terms = dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=settings["beta"])
    return terms.loss, {**terms.log_dict(), "e_w": float(e_w.detach().mean()), "e_l": float(e_l.detach().mean()),
                        "e_w_ref": float(e_w_ref.mean()), "e_l_ref": float(e_l_ref.mean())}


@torch.no_grad()
def probe_preference(generator, probe_w: ProbeSet, x_l: Latent, beta: float | None) -> dict[str, float]:
    """Implicit accuracy and margins on held-out probe pairs (fixed t and noise), policy vs base."""
    dev = generator.device
    stage = generator.stage(probe_w.stage)
    x = latents_to(stage.cat([probe_w.x0, x_l]), dev)
    t = torch.cat([probe_w.t, probe_w.t]).to(dev)
    noise = latents_to(stage.cat([probe_w.noise, stage.noise_like(x_l, probe_w.noise_seeds)]), dev)
    cond = torch.cat([probe_w.cond, probe_w.cond]).to(dev)
    with eval_mode(stage.flow_model):
        e_w, e_l = stage.flow_errors(x, cond, t=t, noise=noise, reduction="mean").chunk(2)
        with lora_mod.reference(stage.flow_model):
            r_w, r_l = stage.flow_errors(x, cond, t=t, noise=noise, reduction="mean").chunk(2)
    delta = (e_w - r_w) - (e_l - r_l)          # < 0: the policy moved towards the winner
    out = {"implicit_accuracy": float((delta < 0).float().mean()),
           "probe_delta_err_w": float((e_w - r_w).mean()), "probe_delta_err_l": float((e_l - r_l).mean())}
    if beta is not None:
        out["probe_margin"] = float((-(beta / 2.0) * delta).mean())
    return out


def train_lora_arm(generator, spec: ArmSpec, data: TargetSet, seed: int, out_dir: Path, live=None) -> dict[str, Any]:
    """Train one LoRA arm on ``generator`` (its flow model gets wrapped), logging to dvclive ``live``;
    save the adapter in ``out_dir``."""
    s = spec.settings
    train_ids, probe_ids = split_probe_objects(data.object_ids, s["probe"]["n_objects"], seed)
    tr_idx, pr_idx = split_indices(data.object_ids, probe_ids)
    train, held = data.subset(tr_idx), data.subset(pr_idx)
    # The pair arms (sft_best, dpo, orpo) share one probe set: same objects, same t and noise.
    cond_kind = "degraded-cond" if spec.kind == "sft_clean" else "clean-cond"
    stage = generator.stage(spec.adapts)
    probe = make_probe_set(stage, held.x_w, held.cond, derive_seed(seed, "arms", "probe", cond_kind))

    lo = s["lora"]
    torch.manual_seed(derive_seed(seed, "train-adapter", spec.arm, "init"))  # peft draws lora_A from it
    stage.flow_model = lora_mod.add_lora(stage.flow_model, lo["rank"], lo["alpha"], lo["dropout"], lo["targets"])
    model = stage.flow_model
    with lora_mod.reference(model):
        before = fm_mse(generator, probe)
    params = lora_mod.trainable_parameters(model)
    tr = s["train"]
    opt = adamw(params, lr=tr["lr"], weight_decay=0.0)
    checkpoint = _run_checkpoint(out_dir, spec, _checkpoint_every(spec, "train"), data.cond, data.x_w, data.x_l,
                                 module=model)
    n = len(train)

    def step_fn(step: int):
        g = _step_generator(seed, spec.arm, step)
        torch.manual_seed(derive_seed(seed, spec.arm, step, "dropout"))  # LoRA dropout masks
        idx = torch.randperm(n, generator=g)[: tr["batch"]]
        loss, logs = lora_step_loss(generator, spec.kind, train, idx, s, g)
        return None if loss is None else (loss, logs)  # None: non-finite errors, the run stops (diverged)

    t0 = time.time()
    result = train_loop(step_fn, modules={"flow": model}, optimizer=opt, scheduler=constant_schedule(opt),
                        steps=tr["steps"], name=f"train-adapter@{spec.arm}", grad_clip=tr["grad_clip"],
                        checkpoint=checkpoint, trainable_only=True, live=live,
                        probes=[Probe(lambda _: {"fm_mse": fm_mse(generator, probe)})])
    train_s = time.time() - t0

    after = result.last_probe()["fm_mse"]
    nonfinite_step = result.stopped_at
    start = result.start_step
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
    metrics.update(_tail_means(result.history))
    lora_mod.save_adapter(model, out_dir)
    drop_checkpoints(out_dir)
    return metrics


def _tail_means(history: list[dict[str, float]], k: int = 10) -> dict[str, float]:
    """Training figures averaged over the last ``k`` steps (a single step is too noisy to report);
    the learning rate (constant here, and in the dvclive curve) is left out."""
    if not history:
        return {}
    tail = [{key: v for key, v in h.items() if key != "lr"} for h in history[-k:]]
    keys = sorted(set().union(*tail))
    return {f"train_{key}_last{k}": sum(h[key] for h in tail if key in h) / sum(key in h for h in tail)
            for key in keys}


# ---------------------------------------------------------------------------------------------
# Conditioner repair
# ---------------------------------------------------------------------------------------------
def train_repair_arm(spec: ArmSpec, data: FeaturePairs, seed: int, out_dir: Path, live=None) -> dict[str, Any]:
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
    checkpoint = _run_checkpoint(out_dir, spec, _checkpoint_every(spec, "repair"), data.degraded, data.clean,
                                 module=repair)
    n = len(train)

    def step_fn(step: int):
        g = _step_generator(seed, spec.arm, step)
        idx = torch.randperm(n, generator=g)[: rp["batch"]]
        loss = feature_mse(repair(train.degraded[idx]), train.clean[idx])
        return loss, {"loss": float(loss.detach())}

    t0 = time.time()
    repair.train()
    result = train_loop(step_fn, modules={"repair": repair}, optimizer=opt, scheduler=constant_schedule(opt),
                        steps=rp["steps"], name=f"train-adapter@{spec.arm}", checkpoint=checkpoint, live=live,
                        probes=[Probe(lambda _: {"feat_mse": feat_mse(repair, held.degraded, held.clean)})])
    after = result.last_probe()["feat_mse"]
    repair.eval()
    repair.save(out_dir)
    drop_checkpoints(out_dir)
    return {"feat_mse_before": before, "feat_mse_after": after,
            "feat_ratio": after / before if math.isfinite(after) else None,
            "diverged": is_diverged(before, after, s["probe"]["threshold"]),
            "probe_threshold": s["probe"]["threshold"], "n_train": len(train), "n_probe": len(held),
            "train_s": time.time() - t0, "resumed_from_step": result.start_step,
            "probe_set": "held-out train-split objects: degraded tokens vs clean tokens",
            **_tail_means(result.history)}


def write_arm_file(out_dir: Path, spec: ArmSpec) -> None:
    (out_dir / ARM_FILE).write_text(json.dumps({"arm": spec.arm, "kind": spec.kind, "severity": spec.severity,
                                                "settings": spec.settings}, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# One arm, end to end
# ---------------------------------------------------------------------------------------------
def untrained_lora_arm(generator, spec: ArmSpec, seed: int, out_dir: Path, t0: float, reason: str) -> dict[str, Any]:
    """A LoRA arm with no training data: the adapter at init (output bit-identical to the base), flagged."""
    lo = spec.settings["lora"]
    torch.manual_seed(derive_seed(seed, "train-adapter", spec.arm, "init"))  # peft draws lora_A from it
    stage = generator.stage(spec.adapts)
    stage.flow_model = lora_mod.add_lora(stage.flow_model, lo["rank"], lo["alpha"], lo["dropout"], lo["targets"])
    lora_mod.save_adapter(stage.flow_model, out_dir)
    write_arm_file(out_dir, spec)
    print(f"WARNING: train-adapter@{spec.arm} NOT trained: {reason}")
    metrics: dict[str, Any] = {"trained": False, "untrained_reason": reason, "n_train": 0, "diverged": False,
                               "fm_mse_before": None, "fm_mse_after": None}
    if spec.kind == "dpo":
        metrics["beta"] = spec.settings["beta"]
    metrics.update({"arm": spec.arm, "kind": spec.kind, "severity": spec.severity, "wall_s": time.time() - t0,
                    "settings": spec.settings})
    return metrics


def run_arm(params: Mapping[str, Any], arm: str, out_dir: str | Path, paths: ArmInputs | None = None,
            live=None, device: str = "cpu") -> dict[str, Any]:
    """Load the base, the arm's data, train (logging to dvclive ``live``), save the adapter + arm.json;
    return the metrics."""
    from judge3d.adapt import data as D
    from judge3d.generators import load_generator

    paths = paths or ArmInputs()
    spec = arm_spec(params, arm)
    seed = require(params, "train_seed", int)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    generator = load_generator(paths.base, device=device)
    train_ids = D.split_object_ids(paths.world, "train")
    if spec.kind == "repair":
        data = D.load_feature_pairs(generator, paths.degraded(spec.severity), train_ids)
        load_s = time.time() - t0
        metrics = train_repair_arm(spec, data, seed, out_dir, live)
    else:
        try:
            if spec.kind == "sft_clean":
                data = D.load_clean_targets(generator, paths.degraded(spec.severity), paths.generated, train_ids,
                                            stage=spec.adapts)
            elif not read_jsonl(paths.pairs):
                raise D.NoTrainingData(f"no swap-consistent training pairs in {paths.pairs}")
            else:
                data = D.load_pairs(generator, paths.pairs, paths.generated, paths.world, stage=spec.adapts)
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
        metrics = train_lora_arm(generator, spec, data, seed, out_dir, live)
        metrics.update({"skipped": data.skipped, "empty_targets": data.empty_targets})
    write_arm_file(out_dir, spec)
    if spec.kind == "dpo":
        metrics["beta"] = spec.settings["beta"]
    metrics.update({"arm": arm, "kind": spec.kind, "severity": spec.severity, "load_s": load_s,
                    "wall_s": time.time() - t0, "settings": spec.settings})
    return metrics
