"""The regularisers of the mask objective (docs/METHOD.md §4).

L = L_LM + λ_s·R_s − λ_w·(1 − t/T)·R_w

* R_s = |d(M̃) − d*|: the density of the soft masks against the target density d* = 1 − s. With
  `global` scope d pools every masked weight (so it is weighted by parameter count); with `layer`
  or `block` scope R_s is the *mean* over layers / blocks of |d_g − d*| (the published per-block
  option sums; a mean keeps λ_s meaning the same for every scope).
* Distillation (optional, `ObjectiveConfig.distill` = α): L_LM becomes
  (1 − α)·L_LM + α·T²·KL(softmax(z_dense/T) ‖ softmax(z/T)), averaged over positions. The teacher
  is the model itself with its masks off, so no second copy of the weights; T² keeps the gradient's
  scale independent of T (Hinton et al., 2015).
* R_w = Σ_l ‖W_l ⊙ M̃_l‖_F / Σ_l ‖W_l‖_F, maximised. Each layer adds its own term from inside its
  forward (see `HybridMask.forward`), so it needs no second pass over the weights.
"""

from __future__ import annotations

import torch

from patchsparse.learn.masked import MaskedModel, group_kept


def density_penalty(groups: list[tuple[torch.Tensor, int]], target_density: float) -> torch.Tensor:
    """Mean over groups of |Σ M̃_g / n_g − d*|. [(kept scalar, numel)] -> scalar"""
    terms = [(kept / numel - target_density).abs() for kept, numel in groups]
    return torch.stack(terms).mean()


def pooled_density(groups: list[tuple[torch.Tensor, int]]) -> float:
    kept = sum(float(k.detach()) for k, _ in groups)
    return kept / sum(n for _, n in groups)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), mean over positions. (..., V), (..., V) -> scalar"""
    vocab = student_logits.shape[-1]
    log_q = torch.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def sparsity_regulariser(masked: MaskedModel, target_sparsity: float, scope: str) -> tuple[torch.Tensor, float]:
    """(R_s with gradient, the pooled soft density) at the sampler's current step."""
    groups = group_kept(masked, scope)
    return density_penalty(groups, 1.0 - target_sparsity), pooled_density(groups)


def weight_magnitude_ratio(masked: MaskedModel) -> float | None:
    """R_w of the last forward (from the norms the layers recorded), or None when R_w is off."""
    norms = masked.sampler.layer_norms
    if not norms:
        return None
    return float(torch.stack([n.float().cpu() for n in norms.values()]).sum()) / masked.weight_norm_total
