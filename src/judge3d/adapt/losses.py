"""The arms' objectives as pure functions of per-sample flow-matching errors.

Every function takes errors ``e`` of shape (B,) (from :meth:`FlowStage.flow_errors`, whose
reduction over latent elements -- ``mean`` or ``sum`` -- is an explicit params choice) and returns
the scalar loss plus the figures worth logging. Nothing here touches a model, so the formulas can
be checked on hand-computed inputs.

Relation to TRL. TRL's ``DPOTrainer`` / ``ORPOTrainer`` compute these losses from token
log-probabilities of a causal LM and cannot drive a flow model (no tokens, no logits, no
sequence log-likelihood). The mapping used here: a flow model's per-sample log-likelihood proxy is
``-e`` up to scale, so

* Flow-DPO = TRL's ``sigmoid`` DPO loss with ``logp = -e / 2`` (Diffusion-DPO, Wallace et al. 2023):
  ``-log sigma(beta * [(logp_w - ref_w) - (logp_l - ref_l)])``;
* ORPO = TRL's ``odds_ratio_loss`` with ``logp = -c * e`` and the SFT term on winners in place of
  the NLL; TRL's ``beta`` is our ``lambda``.

TRL is a test-only dependency (the ``dev`` extra): ``tests/test_adapt.py`` checks the ORPO term
against TRL's own ``ORPOTrainer.odds_ratio_loss`` and ``log1mexp``. They are not called here because
TRL 1.16 keeps them in ``trl.experimental.orpo.orpo_trainer``, whose import pulls in the trainer
stack (transformers' Trainer utilities, peft, accelerate, datasets, pandas): +3.2 s of imports on
top of the 1.3 s that ``judge3d.adapt.train`` takes with torch (``python -X importtime``), and an
experimental-API warning. Its DPO loss has no standalone form at all (it is inlined in
``DPOTrainer._compute_loss``).
Definitions: docs/protocol.md#the-arms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ORPO's log-odds needs logp = -c*e < 0, i.e. e > 0. An error of exactly zero (a perfect
# prediction) would make log(1 - exp(0)) = -inf; errors are floored here instead. The floor is far
# below any flow-matching error a real model reaches (~1e-2), so it only guards the degenerate case.
ORPO_MIN_ERROR = 1e-6


def _check_errors(name: str, e: torch.Tensor) -> None:
    if e.dim() != 1:
        raise ValueError(f"{name} must be per-sample errors of shape (B,), got {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError(f"{name} contains NaN/inf: the model has diverged or its input is corrupt")
    if (e < 0).any():
        raise ValueError(f"{name} contains negative values; flow-matching errors are squared norms")


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"per-sample errors must share one shape, got {shapes}")


def sft_loss(e: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE on the targets (judge winners for ``sft_best``, clean targets for ``sft_clean``)."""
    _check_errors("e", e)
    return e.mean()


@dataclass
class DPOTerms:
    loss: torch.Tensor            # scalar, mean over pairs
    inside: torch.Tensor          # (B,) the sigmoid's argument
    reward_w: torch.Tensor        # (B,) implicit reward of the winner, -(beta/2)(e_w - e_w_ref)
    reward_l: torch.Tensor        # (B,)

    @property
    def margin(self) -> torch.Tensor:
        return self.reward_w - self.reward_l

    @property
    def implicit_accuracy(self) -> torch.Tensor:
        """Share of pairs where the policy already prefers the winner more than the reference does."""
        return (self.inside > 0).float().mean()

    def log_dict(self) -> dict[str, float]:
        inside = self.inside.detach()
        return {"loss": float(self.loss.detach()), "inside_mean": float(inside.mean()),
                "inside_abs_mean": float(inside.abs().mean()),
                "implicit_acc": float(self.implicit_accuracy),
                "reward_w": float(self.reward_w.detach().mean()), "reward_l": float(self.reward_l.detach().mean()),
                "margin": float(self.margin.detach().mean())}


def dpo_loss(e_w: torch.Tensor, e_l: torch.Tensor, e_w_ref: torch.Tensor, e_l_ref: torch.Tensor,
             beta: float) -> DPOTerms:
    """Flow-DPO (Diffusion-DPO form): ``inside = -(beta/2)[(e_w - e_w_ref) - (e_l - e_l_ref)]``,
    ``loss = -log sigma(inside)``.

    The caller must evaluate all four errors at the same ``t`` within a pair and the same noise for
    policy and reference; the reference errors carry no gradient. Scale warning
    (docs/protocol.md#flow-dpo): with per-element mean errors and beta ~ 0.1, ``inside`` stays ~0
    and the gradient is the unanchored ``-(beta/4) d(e_w - e_l)`` push; log ``inside`` to see which
    regime a run is in.
    """
    for name, e in (("e_w", e_w), ("e_l", e_l), ("e_w_ref", e_w_ref), ("e_l_ref", e_l_ref)):
        _check_errors(name, e)
    _same_shape(e_w=e_w, e_l=e_l, e_w_ref=e_w_ref, e_l_ref=e_l_ref)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"DPO beta must be a positive number, got {beta!r}")
    reward_w = -(beta / 2.0) * (e_w - e_w_ref.detach())
    reward_l = -(beta / 2.0) * (e_l - e_l_ref.detach())
    inside = reward_w - reward_l
    return DPOTerms(loss=-F.logsigmoid(inside).mean(), inside=inside, reward_w=reward_w, reward_l=reward_l)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    if (x >= 0).any():
        raise ValueError("log1mexp needs x < 0 (a log-probability strictly below 0)")
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class ORPOTerms:
    loss: torch.Tensor            # scalar: sft + lam * odds_ratio
    sft: torch.Tensor             # scalar: mean e_w
    odds_ratio: torch.Tensor      # scalar: mean -log sigma(log_odds)
    log_odds: torch.Tensor        # (B,)

    def log_dict(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "sft": float(self.sft.detach()),
                "odds_ratio": float(self.odds_ratio.detach()),
                "log_odds": float(self.log_odds.detach().mean()),
                "implicit_acc": float((self.log_odds > 0).float().mean())}


def orpo_loss(e_w: torch.Tensor, e_l: torch.Tensor, lam: float, c: float,
              min_error: float = ORPO_MIN_ERROR) -> ORPOTerms:
    """ORPO: ``mean(e_w) + lam * mean(-log sigma(log_odds))`` with the likelihood proxy ``l = -c e``,

    ``log_odds = (l_w - l_l) - (log1mexp(l_w) - log1mexp(l_l))`` (the log of odds(w) / odds(l),
    odds = p / (1 - p), p = exp(l)). Errors are floored at ``min_error`` so ``l < 0`` holds.
    """
    _check_errors("e_w", e_w)
    _check_errors("e_l", e_l)
    _same_shape(e_w=e_w, e_l=e_l)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"ORPO c must be a positive number, got {c!r}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"ORPO lambda must be >= 0, got {lam!r}")
    ll_w = -c * e_w.clamp(min=min_error)
    ll_l = -c * e_l.clamp(min=min_error)
    log_odds = (ll_w - ll_l) - (log1mexp(ll_w) - log1mexp(ll_l))
    sft = e_w.mean()
    odds_ratio = -F.logsigmoid(log_odds).mean()
    return ORPOTerms(loss=sft + lam * odds_ratio, sft=sft, odds_ratio=odds_ratio, log_odds=log_odds)


def feature_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Conditioner repair: mean squared error between repaired and clean tokens (all elements)."""
    if pred.shape != target.shape:
        raise ValueError(f"repaired and clean features differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return ((pred - target) ** 2).mean()
