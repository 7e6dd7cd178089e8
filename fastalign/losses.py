"""Preference and demonstration losses on sequence log-probabilities.

Functional losses take [B]-sized log-probabilities and return per-pair losses [B] (reduce as you like),
except ``weighted_bt_loss`` and ``sft_loss`` which return scalars. They are plain differentiable PyTorch.
The fused modules (``FusedDPOLoss`` ...) take hidden states and the lm_head weight and run the fused op; they
live in ``fastalign.fused_losses`` and are re-exported here.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from fastalign._lazy import lazy_attributes
from fastalign.ops import linear_logprobs, sequence_logprobs  # noqa: F401  (importable from here, as before)

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_same_shape(**tensors):
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if any(len(s) != 1 for s in shapes.values()) or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one shape [B], got {shapes}")


def _check_label_smoothing(eps, loss_type):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps!r}")
    if eps > 0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing={eps} has no meaning for loss_type={loss_type!r}; "
                         "it applies to 'sigmoid' (cDPO) and 'robust'")


def check_dpo_options(beta, loss_type, label_smoothing):
    _check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    _check_label_smoothing(label_smoothing, loss_type)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0):
    """Direct Preference Optimization and its variants; per-pair losses [B].

    h = (pc - rc) - (pr - rr), eps = label_smoothing:
      sigmoid  -(1 - eps) logsig(beta h) - eps logsig(-beta h)         (Rafailov et al. 2023; cDPO for eps > 0)
      robust   (-(1 - eps) logsig(beta h) + eps logsig(-beta h)) / (1 - 2 eps)     (Chowdhury et al. 2024)
      hinge    relu(1 - beta h)                                              (SLiC, Zhao et al. 2023)
      ipo      (h - 1 / (2 beta))^2, on length-averaged log-probs        (Azar et al. 2023)
    """
    check_dpo_options(beta, loss_type, label_smoothing)
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024), reference-free with a target margin; per-pair losses [B].

    m = beta * (avg_logp(chosen) - avg_logp(rejected)) - gamma;  -(1 - eps) logsig(m) - eps logsig(-m)
    """
    _check_positive("beta", beta)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or math.isnan(gamma):
        raise ValueError(f"gamma must be a number, got {gamma!r}")
    _check_label_smoothing(label_smoothing, "sigmoid")
    _check_same_shape(policy_chosen_avg_logps=policy_chosen_avg_logps,
                      policy_rejected_avg_logps=policy_rejected_avg_logps)
    m = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)


def orpo_log_odds_ratio(chosen_avg_logps, rejected_avg_logps):
    """log odds(chosen) - log odds(rejected), odds(y) = P(y) / (1 - P(y)) with P from avg token log-probs."""
    def log_odds(a):
        # a <= 0; log(1 - exp(a)) is -inf at a = 0: clamp just below so a certain answer stays finite
        a = a.clamp(max=-1e-6)
        return a - torch.log(-torch.expm1(a))
    return log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)


def orpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, *, lam=0.1):
    """ORPO (Hong et al. 2024); per-pair losses [B].

    NLL(chosen) + lam * -logsig(log odds(chosen) - log odds(rejected)),  NLL = -avg_logp(chosen)
    """
    _check_positive("lam", lam)
    _check_same_shape(policy_chosen_avg_logps=policy_chosen_avg_logps,
                      policy_rejected_avg_logps=policy_rejected_avg_logps)
    ratio = orpo_log_odds_ratio(policy_chosen_avg_logps, policy_rejected_avg_logps)
    return -policy_chosen_avg_logps - lam * F.logsigmoid(ratio)


def weighted_bt_loss(chosen_scores, rejected_scores, weights=None, margins=None):
    """Weighted Bradley-Terry MLE (Clone-Robust AI Alignment); a scalar.

    -sum_i w_i logsig(c_i - r_i - m_i) / sum_i w_i; weights=None is the plain mean, margins=None is m = 0. A pair's
    weight is w(chosen) * w(rejected), each alternative weighted by how unique it is among its near-duplicates; a
    margin m_i asks the chosen answer to score m_i more (Llama 2's margin loss, TRL's ``margin`` column).
    """
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if margins is not None:
        _check_same_shape(chosen_scores=chosen_scores, margins=margins)
        rejected_scores = rejected_scores + margins.to(rejected_scores)
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return weighted_mean(losses, weights)


def sft_loss(sequence_logps, n_tokens):
    """Mean token negative log-likelihood of demonstrations; a scalar.

    -sum_b logp(y_b) / sum_b |y_b|: minimizing it minimizes the forward KL(p_demo || pi) up to a constant
    (alignment from demonstrations).
    """
    _check_same_shape(sequence_logps=sequence_logps, n_tokens=n_tokens)
    total = n_tokens.sum()
    # no labelled token (an empty batch): loss 0 with zero gradients (see weighted_mean), without a sync
    return -sequence_logps.sum() / total.clamp_min(1)


def check_pair_weights(weights, shape, dtype, device):
    """weights (a tensor or anything torch.as_tensor takes) as a tensor of ``shape``, after checking it: one per
    pair, finite, non-negative."""
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=dtype, device=device)
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(f"weights must have shape {tuple(shape)} (one per pair), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or bool((weights < 0).any()):
        raise ValueError(f"weights must be finite and non-negative, got min {weights.min().item()}")
    return weights.to(dtype)


def check_token_inputs(hidden, labels, sequence_index=None):
    """hidden [rows, T, H], labels [rows, T] and, packed, sequence_index [rows, T]: raise naming what differs."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [rows, T, H], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels must be [rows, T] = {tuple(hidden.shape[:2])} to match hidden, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if sequence_index is not None and tuple(sequence_index.shape) != tuple(labels.shape):
        raise ValueError(f"sequence_index must be [rows, T] = {tuple(labels.shape)}, got "
                         f"{tuple(sequence_index.shape)}")


def weighted_mean(losses, weights=None):
    """Mean of per-pair losses [B], or sum w_i l_i / sum w_i with non-negative weights [B].

    The empty case, the same for every loss: no pairs (B = 0) or weights that are all zero give loss 0,
    connected to the graph so that backward() leaves zero gradients; a pair of weight 0 contributes nothing
    (not even a NaN from an infinite loss). No device synchronisation is needed for either.
    """
    if weights is None:
        return losses.sum() / max(losses.numel(), 1)
    w = check_pair_weights(weights, losses.shape, losses.dtype, losses.device)
    total = w.sum()
    weighted = torch.where(w > 0, w * losses, torch.zeros_like(losses))
    return weighted.sum() / torch.where(total > 0, total, torch.ones_like(total))


def weighted_mle_loss(rewards, pairs, *, weights=None, prob=None, lam=0.0):
    """The weighted regularized MLE of Clone-Robust AI Alignment (Procaccia, Schiffer and Zhang, 2025); a scalar.

    rewards [M] (one per alternative), pairs [P, 2] int64 (alternatives x1, x2 that were compared), weights [M]
    (clone-robust weights w(x) >= 0, e.g. ``fastalign.clone_robust_weights``; None: every w = 1, the standard
    regularized MLE), prob [P] (fraction of comparisons that preferred x1; None: 1), lam >= 0:

        -sum_k w(x1) w(x2) [p_k log sigmoid(r(x1) - r(x2)) + (1 - p_k) log sigmoid(r(x2) - r(x1))]
        + (lam / 2) sum_x w(x) r(x)^2
    """
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point() or rewards.dim() != 1:
        raise TypeError(f"weighted_mle_loss: rewards must be a float tensor [M], got "
                        f"{getattr(rewards, 'dtype', type(rewards).__name__)} {tuple(getattr(rewards, 'shape', ()))}")
    m = rewards.shape[0]
    if not isinstance(pairs, torch.Tensor) or pairs.is_floating_point() or pairs.dtype == torch.bool:
        raise TypeError(f"weighted_mle_loss: pairs must be an integer tensor [P, 2], got "
                        f"{getattr(pairs, 'dtype', type(pairs).__name__)}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"weighted_mle_loss: pairs must be [P, 2], got shape {tuple(pairs.shape)}")
    pairs = pairs.to(device=rewards.device, dtype=torch.int64)
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= m):
        bad = pairs[(pairs < 0) | (pairs >= m)]
        raise ValueError(f"weighted_mle_loss: pairs index alternatives 0..{m - 1} (M = {m} rewards), found "
                         f"{bad[:5].tolist()}")
    if weights is None:
        weights = torch.ones_like(rewards)
    else:
        if not isinstance(weights, torch.Tensor) or weights.shape != (m,):
            raise ValueError(f"weighted_mle_loss: weights must be a tensor [M] = [{m}], got "
                             f"{tuple(getattr(weights, 'shape', ())) or type(weights).__name__}")
        weights = weights.to(rewards)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weighted_mle_loss: weights must be finite and >= 0")
    p = pairs.shape[0]
    if prob is None:
        prob = torch.ones(p, dtype=rewards.dtype, device=rewards.device)
    else:
        if not isinstance(prob, torch.Tensor) or prob.shape != (p,):
            raise ValueError(f"weighted_mle_loss: prob must be a tensor [P] = [{p}], got "
                             f"{tuple(getattr(prob, 'shape', ())) or type(prob).__name__}")
        prob = prob.to(rewards)
        if not bool(((prob >= 0) & (prob <= 1)).all()):
            raise ValueError("weighted_mle_loss: prob must lie in [0, 1] (the fraction preferring x1)")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 <= lam < math.inf:
        raise ValueError(f"weighted_mle_loss: lam must be a finite number >= 0, got {lam!r}")
    margin = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    pair_w = weights[pairs[:, 0]] * weights[pairs[:, 1]]
    fit = pair_w * (prob * F.logsigmoid(margin) + (1 - prob) * F.logsigmoid(-margin))
    return -fit.sum() + 0.5 * lam * (weights * rewards ** 2).sum()


# The fused loss modules live in fastalign.fused_losses, which imports the functions above. They stay importable from
# here (the same objects) through a module __getattr__, so neither module imports the other at import time.
_MOVED_TO_FUSED_LOSSES = ("FusedDPOLoss", "FusedORPOLoss", "FusedSFTLoss", "FusedSimPOLoss", "PreferenceLossOutput",
                          "SFTLossOutput", "_FusedLogprobs", "_FusedPreferenceLoss")


__getattr__ = lazy_attributes(__name__, dict.fromkeys(_MOVED_TO_FUSED_LOSSES, "fastalign.fused_losses"))
