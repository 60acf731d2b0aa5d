"""Train a tiny judge from scratch to answer "A"/"B" on oracle-labelled montage pairs.

Inputs go through :meth:`HFJudge.query_logits`, the same code that serves the judge at inference,
so training and judging see the same token ids, positions and vision features. Loss: cross-entropy
of the correct answer letter (bare id) at the answer position. Presentation order is drawn per
sample from a seeded stream (so the judge cannot learn "the answer is always A").

After training the judge is scored on pairs of held-out objects from its own object set (clear,
mild and near-tie pairs, both orders) and saved only if it is not degenerate
(docs/protocol.md#the-tiny-judges: a judge stuck in the ln 2 plateau answers a constant letter:
flip 1.0 / strict 0 on clear pairs).

The loop, LR schedule (linear warm-up, cosine to 0), dvclive curve and resumable checkpoints are
:mod:`judge3d.core.training`'s.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from judge3d.world.corruptions import build_pairs, split_objects
from judge3d.core.numerics import adamw
from judge3d.core.resume import checkpoint_dir, drop_checkpoints
from judge3d.core.seeding import rng, seed_everything
from judge3d.core.stats import wilson_interval
from judge3d.judges.slots import REFERENCE_SLOT, prompt_image_count


class DegenerateJudgeError(RuntimeError):
    """The trained judge answers by position or not at all; it is not saved."""


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    heldout_frac: float = 0.25          # share of the judge's own objects kept for its evaluation
    margin: float = 0.02                # oracle gap below which a pair is a near-tie (never a label)
    clear_gap: float = 0.10             # oracle gap at/above which a pair is "clear"
    max_pairs_per_object: int = 40      # per kind, seeded draw
    curriculum_steps: int = 0           # the first steps draw clear pairs only (breaks the ln 2 plateau sooner)
    paired_orders: bool = False         # each drawn pair appears in both orders within its batch
    # refuse to save unless the Wilson 95 % lower bound of the decisive rate W/(W+L) on clear held-out
    # pairs is above this (0.5: the judge's consistent verdicts beat chance)
    min_clear_decisive_lo: float = 0.5
    max_clear_flip: float = 0.5         # ... or above this flip rate on them
    refuse_degenerate: bool = True      # off only in the tiny plumbing profile (too few steps to learn)
    log_every: int = 10
    checkpoint_every: int = 100

    @classmethod
    def from_params(cls, block: dict[str, Any], seed: int) -> "TrainConfig":
        """From params ``judges.training``; ``seed`` is params ``train_seed``, shared with the generator
        and the arms so that one value retrains every model."""
        if "seed" in block:
            raise ValueError("judges.training.seed is gone: the judges train with the top-level train_seed "
                             "(shared with pretrain-base and the arms); delete the key.")
        known = set(cls.__dataclass_fields__) - {"seed"}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"judges.training: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**block, seed=int(seed))
        if cfg.paired_orders and cfg.batch_size % 2:
            raise ValueError(f"judges.training.batch_size {cfg.batch_size} must be even with paired_orders "
                             "(each pair is shown in both orders).")
        return cfg


def sample_batch(train_pairs: Sequence[dict], step: int, cfg: TrainConfig, name: str) -> tuple[list[dict], np.ndarray]:
    """The pairs of one training step and, per pair, whether the better montage is shown first.

    A seeded draw per (seed, name, step), so a resumed run sees the same batches. During the first
    ``cfg.curriculum_steps`` steps only clear pairs are drawn (when there are at least a batch of them):
    the big oracle gaps teach the judge to compare its two images before the subtle mild pairs come in.

    With ``cfg.paired_orders`` each of ``batch_size / 2`` drawn pairs is shown in both orders. The
    order-blind part of the judge's answer then gets opposite pushes that cancel within the batch, and
    what is left of the gradient trains the comparison itself (a control variate for the random order).
    """
    pool = list(train_pairs)
    n_pairs = cfg.batch_size // 2 if cfg.paired_orders else cfg.batch_size
    if step < cfg.curriculum_steps:
        clear = [p for p in train_pairs if p["kind"] == "clear"]
        if len(clear) >= n_pairs:
            pool = clear
    g = rng(cfg.seed, "judge-batch", name, step)
    drawn = [pool[i] for i in g.choice(len(pool), n_pairs, replace=False)]
    if cfg.paired_orders:
        return [p for p in drawn for _ in range(2)], np.tile([True, False], n_pairs)
    return drawn, g.random(cfg.batch_size) < 0.5


def _config_hash(arch: str, sizes: Any, cfg: TrainConfig, prompt: str, pairs: Sequence[dict],
                 references: Mapping[str, str] | None = None) -> str:
    spec = {"arch": arch, "sizes": asdict(sizes), "cfg": asdict(cfg), "prompt": prompt,
            "pairs": [(p["better"], p["worse"]) for p in pairs]}
    if references is not None:  # only when given, so reference-free checkpoints keep their hash
        spec["references"] = {oid: str(references[oid]) for oid in sorted({p["object_id"] for p in pairs})}
    blob = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_references(prompt: str, references: Mapping[str, str] | None, object_ids, name: str) -> bool:
    """Whether the judge is reference-aware (its prompt names ``<image0>``); raises ValueError if
    ``references`` (object id -> input image) is missing there, lacks an object, or is given for a
    reference-free prompt."""
    aware = prompt_image_count(prompt) == 3
    if aware and references is None:
        raise ValueError(f"{name}: the judge prompt names the reference slot {REFERENCE_SLOT}; pass references "
                         "(object id -> the object's input image) for every training and held-out object.")
    if not aware and references is not None:
        raise ValueError(f"{name}: references were given but the judge prompt has no {REFERENCE_SLOT} slot to show "
                         f"them; add {REFERENCE_SLOT} before <image1> in the prompt, or pass references=None.")
    if aware:
        missing = sorted({str(o) for o in object_ids} - set(references))
        if missing:
            raise ValueError(f"{name}: no reference image for {len(missing)} object(s) {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}; references must map every object id to its "
                             "input image.")
    return aware


def evaluate_pairs(judge, pairs: Sequence[dict], prompt: str, prepared: dict[str, Any] | None = None,
                   n_boot: int = 200, seed: int = 0, references: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Swap-protocol aggregates per pair kind: x = the oracle-better montage, y = the worse one.
    ``references`` (object id -> input image) for a reference-aware prompt: each query shows the
    pair's reference first."""
    from judge3d.judges import protocol
    from judge3d.judges.verdict_log import prompt_sha256

    out: dict[str, Any] = {}
    for kind in ("clear", "mild", "near"):
        chosen = [p for p in pairs if p["kind"] == kind]
        if not chosen:
            continue
        queries = [(p["better"], p["worse"]) for p in chosen] + [(p["worse"], p["better"]) for p in chosen]
        if references is not None:
            queries = [(references[p["object_id"]], *q) for p, q in zip(chosen + chosen, queries)]
        probs = judge.p_first(queries, prompt)
        n = len(chosen)
        rows = []
        for i, p in enumerate(chosen):
            base = {"pair_id": p["pair_id"], "object_id": p["object_id"], "judge_id": judge.judge_id,
                    "prompt_sha256": prompt_sha256(prompt), "x_oracle": p["better_score"],
                    "y_oracle": p["worse_score"]}
            rows.append({**base, "order": "xy", "p_first": float(probs[i])})
            rows.append({**base, "order": "yx", "p_first": float(probs[n + i])})
        agg = protocol.summarize(rows, n_boot=n_boot, seed=seed)
        out[kind] = {k: agg[k] for k in ("n", "n_objects", "W", "L", "F", "strict", "strict_wilson_ci",
                                         "decisive", "flip_rate", "prefer_first_rate",
                                         "judge_oracle_agreement")}
    return out


def check_not_degenerate(metrics: dict[str, Any], cfg: TrainConfig, name: str) -> None:
    clear = metrics.get("clear")
    if clear is None:
        raise DegenerateJudgeError(f"{name}: no clear-gap held-out pairs to check the judge on; add candidates "
                                   "with larger oracle gaps (e.g. stronger corruptions) or lower judges.training.clear_gap.")
    problems = []
    if clear["flip_rate"] >= 1.0 or clear["strict"] == 0:
        problems.append("it answers by position (flip rate 1.0 or strict 0 on clear pairs: the ln 2 plateau)")
    # Degenerate means no better than chance, not weak: a weak judge is saved, its held-out quality
    # is reported (data/judge_training/<role>.json), and the calibration controls decide whether the
    # study can trust it (the report's UNRELIABLE banner).
    decisive_lo = wilson_interval(clear["W"], clear["W"] + clear["L"])[0] if clear["W"] + clear["L"] else 0.0
    if decisive_lo <= cfg.min_clear_decisive_lo:
        problems.append(f"its consistent verdicts on clear pairs are not above chance: decisive "
                        f"{clear['decisive']} ({clear['W']}/{clear['W'] + clear['L']}), Wilson 95 % lower bound "
                        f"{decisive_lo:.3f} <= {cfg.min_clear_decisive_lo}")
    if clear["flip_rate"] > cfg.max_clear_flip:
        problems.append(f"clear-gap flip rate {clear['flip_rate']} > {cfg.max_clear_flip}")
    if problems and not cfg.refuse_degenerate:
        print(f"WARNING: {name} is degenerate ({'; '.join(problems)}); saved anyway because "
              "judges.training.refuse_degenerate is false (tiny profile only)")
        return
    if problems:
        raise DegenerateJudgeError(
            f"{name} is degenerate and was NOT saved: " + "; ".join(problems) + f". Held-out metrics: {metrics}. "
            "Train longer (judges.training.steps), give it more/cleaner pairs, or a larger model; never "
            "inject bias by hand.")


def new_tiny_judge(arch: str, sizes, *, seed: int, name: str, device: str = "cpu"):
    """A random-init tiny judge of ``arch`` behind :class:`HFJudge`, the query path the judging stages use
    (image processor, chat template, padding); with its tokenizer and image processor, for saving.
    Nothing is written to disk."""
    from judge3d.judges.hf import HFJudge, make_image_only_processor
    from judge3d.judges.tiny import INTERNVL_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, build_tiny_judge, image_seq_length

    model, tok, image_processor = build_tiny_judge(None, arch, sizes, seed=seed, save=False)
    model.to(device)
    template = QWEN_CHAT_TEMPLATE if arch == "qwen2_5_vl" else INTERNVL_CHAT_TEMPLATE
    processor = make_image_only_processor(arch, tok, image_processor, template,
                                          image_seq_length(sizes) if arch == "internvl" else None)
    return HFJudge(model, processor, name=name, weights_hash="0" * 64, batch_size=64), tok, image_processor


def train_judge(arch: str, sizes, candidates: Sequence[dict[str, Any]], out_dir: str | Path, prompt: str,
                cfg: TrainConfig, *, name: str, live=None, root: str | Path = ".", device: str = "cpu",
                save: bool = True, extra_train_candidates: Sequence[dict[str, Any]] = (),
                references: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Train (logging to dvclive ``live``), evaluate on held-out objects, refuse a degenerate judge,
    save the HF folder; return a summary. ``device`` other than the CPU, ``save=False`` and
    ``extra_train_candidates`` (candidates of other objects, used for training only, so the held-out
    objects and pairs stay those of ``candidates``) are for sweeps (benchmarks/judge_sweep.py): the
    pipeline trains on the CPU, whose numerics are pinned.

    ``references``: object id -> its input image (relative to ``root``, like the montage paths), for
    a reference-aware judge (a prompt naming ``<image0>``): required then, for every object, and
    forbidden otherwise. Every training, held-out and probe query then shows the reference first."""
    import torch

    from judge3d.core.training import Checkpointing, cosine_schedule, train

    from judge3d.judges.hf import HFJudge, open_image
    from judge3d.judges.tiny import save_tiny_judge

    t0 = time.time()
    out_dir = Path(out_dir)
    root = Path(root)
    aware = check_references(prompt, references, [c["object_id"] for c in (*candidates, *extra_train_candidates)],
                             name)
    seed_everything(cfg.seed)
    pairs = build_pairs(candidates, margin=cfg.margin, clear_gap=cfg.clear_gap,
                        max_pairs_per_object=cfg.max_pairs_per_object, seed=cfg.seed)
    train_objects, held_objects = split_objects([c["object_id"] for c in candidates], cfg.heldout_frac, cfg.seed)
    held = set(held_objects)
    train_pairs = [p for p in pairs if p["object_id"] not in held and p["kind"] != "near"]
    eval_pairs = [p for p in pairs if p["object_id"] in held]
    if extra_train_candidates:
        if held & {c["object_id"] for c in extra_train_candidates}:
            raise ValueError(f"{name}: extra training candidates include held-out objects")
        extra = build_pairs(extra_train_candidates, margin=cfg.margin, clear_gap=cfg.clear_gap,
                            max_pairs_per_object=cfg.max_pairs_per_object, seed=cfg.seed)
        train_pairs += [p for p in extra if p["kind"] != "near"]
        pairs = pairs + extra
    if len(train_pairs) < cfg.batch_size:
        raise ValueError(f"{name}: only {len(train_pairs)} labelled training pairs (need >= batch size "
                         f"{cfg.batch_size}); give the judge more candidates per object or lower judges.training.margin.")

    judge, tok, image_processor = new_tiny_judge(arch, sizes, seed=cfg.seed, name=name, device=device)
    model = judge.model
    target = {letter: ids[0] for letter, ids in judge.answer_ids.items()}  # the bare letter, as the template answers

    paths = sorted({p[k] for p in pairs for k in ("better", "worse")})
    if aware:  # each object's input image, prepared once like the montages
        paths = sorted(set(paths) | {references[p["object_id"]] for p in pairs})
    prepared = {}
    for path in tqdm(paths, desc=f"{name}: preprocess montages", unit="img", leave=False):
        prepared[path] = judge.arch.prepare(open_image(root / path))

    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    config_hash = _config_hash(arch, sizes, cfg, prompt, train_pairs, references if aware else None)
    # outside the DVC output, which DVC deletes before a rerun
    checkpoint = Checkpointing(checkpoint_dir(out_dir, config_hash), config_hash, cfg.checkpoint_every)

    def step_fn(step: int):
        batch, better_first = sample_batch(train_pairs, step, cfg, name)
        index: dict[str, int] = {}
        for p in batch:
            if aware:
                index.setdefault(references[p["object_id"]], len(index))
            for k in ("better", "worse"):
                index.setdefault(p[k], len(index))
        images = [prepared[path] for path in index]
        queries = [(index[p["better"]], index[p["worse"]]) if bf else (index[p["worse"]], index[p["better"]])
                   for p, bf in zip(batch, better_first)]
        if aware:  # the reference first, then the two montages in the drawn order
            queries = [(index[references[p["object_id"]]], *q) for p, q in zip(batch, queries)]
        # index 0 = "A" (the first image is better), 1 = "B"
        logits = judge.query_logits(images, queries, prompt)
        labels = torch.from_numpy((~better_first).astype(np.int64)).to(logits.device)
        # Two-way loss over the answer letters, the only tokens the protocol reads (p_first): a
        # full-vocabulary loss spends its first steps learning to say a letter at all.
        pick = logits[:, [target["A"], target["B"]]].float()
        loss = torch.nn.functional.cross_entropy(pick, labels)
        with torch.no_grad():
            acc = float(((pick[:, 0] > pick[:, 1]).cpu() == torch.from_numpy(better_first)).float().mean())
        return loss, {"loss": float(loss.detach()), "accuracy": acc}

    model.train()
    train(step_fn, modules={"model": model}, optimizer=opt, scheduler=sched, steps=cfg.steps, name=f"judge {name}",
          grad_clip=cfg.grad_clip, checkpoint=checkpoint, live=live, log_every=cfg.log_every)
    train_s = time.time() - t0

    model.eval()
    # eval goes through p_first, exactly as the judging stages will call the saved judge
    abs_refs = {oid: str(root / path) for oid, path in references.items()} if aware else None
    metrics = evaluate_pairs(judge, [_abs(p, root) for p in eval_pairs], prompt, seed=cfg.seed, references=abs_refs)
    if not save:
        out = {"name": name, "arch": arch, "n_params": sum(p.numel() for p in model.parameters()),
               "n_train_pairs": len(train_pairs), "n_eval_pairs": len(eval_pairs), "heldout": metrics,
               "train_wall_s": round(train_s, 1)}
        if aware:
            out["reference_aware"] = True
        return out
    check_not_degenerate(metrics, cfg, name)

    summary = {"name": name, "arch": arch, "sizes": asdict(sizes), "training": asdict(cfg),
               "n_params": sum(p.numel() for p in model.parameters()),
               "n_train_pairs": len(train_pairs), "n_eval_pairs": len(eval_pairs),
               "train_objects": len(train_objects), "heldout_objects": held_objects,
               "heldout": metrics}
    if aware:  # only then, so a reference-free judge's folder and summary stay byte-identical
        summary["reference_aware"] = True
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # no wall times inside the judge folder: a forced rerun must give a byte-identical judge
    save_tiny_judge(tmp, model, tok, image_processor, arch, sizes, extra={"training": summary})
    summary["train_wall_s"] = round(train_s, 1)
    # the saved folder must judge exactly as the in-memory model did
    reloaded = HFJudge.load(tmp, name=name)
    probe = [(root / p["better"], root / p["worse"]) for p in eval_pairs[:4]]
    if aware:
        probe = [(root / references[p["object_id"]], *q) for p, q in zip(eval_pairs[:4], probe)]
    if probe and not np.allclose(reloaded.p_first(probe, prompt), judge.p_first(probe, prompt), atol=1e-5):
        raise RuntimeError(f"{name}: the saved judge does not reproduce the trained one; not saved.")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    drop_checkpoints(out_dir)
    summary["judge_id"] = HFJudge.load(out_dir, name=name).judge_id
    summary["wall_s"] = round(time.time() - t0, 1)
    return summary


def _abs(pair: dict, root: Path) -> dict:
    return {**pair, "better": str(root / pair["better"]), "worse": str(root / pair["worse"])}
