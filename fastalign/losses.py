"""Preference and demonstration losses on sequence log-probabilities.

Functional losses take [B]-sized log-probabilities and return per-pair losses [B] (reduce as you like),
except ``weighted_bt_loss`` and ``sft_loss`` which return scalars. They are plain differentiable PyTorch.
The fused modules (``FusedDPOLoss`` ...) take hidden states and the lm_head weight and run the fused op.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastalign.ops import linear_logprobs, sequence_logprobs

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


def weighted_bt_loss(chosen_scores, rejected_scores, weights=None):
    """Weighted Bradley-Terry MLE (Clone-Robust AI Alignment); a scalar.

    -sum_i w_i logsig(c_i - r_i) / sum_i w_i; weights=None is the plain mean. A pair's weight is
    w(chosen) * w(rejected), each alternative weighted by how unique it is among its near-duplicates.
    """
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
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


@dataclass
class PreferenceLossOutput:
    """loss: scalar; per pair [B]: losses, chosen/rejected log-probs (summed over tokens), rewards (detached),
    reward_margins = chosen - rejected rewards, reward_accuracies = 1.0 where chosen reward > rejected."""
    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_margins: torch.Tensor
    reward_accuracies: torch.Tensor
    chosen_n_tokens: Optional[torch.Tensor] = None
    rejected_n_tokens: Optional[torch.Tensor] = None
    nll_loss: Optional[torch.Tensor] = None


@dataclass
class SFTLossOutput:
    loss: torch.Tensor
    sequence_logps: torch.Tensor
    n_tokens: torch.Tensor


class _FusedLogprobs(torch.nn.Module):
    """Shared base: runs the fused op from hidden states and the lm_head to per-sequence log-probs."""

    def __init__(self, *, ignore_index=-100, temperature=1.0, softcap=None, backend="auto", deterministic=False,
                 grad_filter_eps=None, grad_in_forward=False, chunk_rows=None):
        super().__init__()
        # gradient computed in forward (fastalign.fused_grad): 3 GEMMs instead of 4; per-pair outputs detached
        self.grad_in_forward, self.chunk_rows = bool(grad_in_forward), chunk_rows
        self.grad_filter_eps = grad_filter_eps  # opt-in approximate backward; see linear_logprobs
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.softcap = softcap
        self.backend = backend
        self.deterministic = deterministic

    def _grad_in_forward_applies(self, *tensors):
        return (self.grad_in_forward and not self.grad_filter_eps and torch.is_grad_enabled()
                and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))

    def sequence_logps(self, hidden, weight, labels, bias=None, sequence_index=None, n_sequences=None):
        """Per-sequence summed log-probs and token counts.

        Padded: hidden [S, T, H], labels [S, T], one sequence per row. Packed (padding-free): also
        sequence_index [R, T] naming each token's sequence in [0, n_sequences) (-1 for padding).
        """
        check_token_inputs(hidden, labels, sequence_index)
        if self.grad_in_forward and not self.grad_filter_eps and not torch.is_grad_enabled():
            # a reference or evaluation pass: the row pass and row order of the gradient-in-forward path, so that
            # equal policy and reference models give equal log-probs bit for bit
            from fastalign.fused_grad import forward_logps
            return forward_logps(self, hidden, weight, labels, bias, sequence_index, n_sequences,
                                 pairs=isinstance(self, _FusedPreferenceLoss))
        kw = dict(ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
                  backend=self.backend, deterministic=self.deterministic)
        if self.grad_filter_eps is not None:
            kw["grad_filter_eps"] = self.grad_filter_eps
        if sequence_index is None:
            return sequence_logprobs(hidden, weight, labels, bias, **kw)
        if n_sequences is None:
            n_sequences = int(sequence_index.max()) + 1
        r, t, h = hidden.shape
        tok = linear_logprobs(hidden.reshape(r * t, h), weight, labels.reshape(-1), bias, **kw)
        seq = sequence_index.reshape(-1)
        keep = (seq >= 0) & (labels.reshape(-1) != self.ignore_index)
        idx = torch.where(keep, seq, 0)
        sums = tok.new_zeros(n_sequences).index_add(0, idx, torch.where(keep, tok, tok.new_zeros(())))
        counts = torch.zeros(n_sequences, dtype=torch.long, device=seq.device).index_add_(0, idx, keep.long())
        return sums, counts


class _FusedPreferenceLoss(_FusedLogprobs):
    """Shared base of the pairwise losses. hidden [2B, T, H]: chosen rows 0..B-1, rejected rows B..2B-1;
    labels [2B, T] aligned with hidden, ``ignore_index`` on prompt and padding. Subclasses state
    ``pair_losses`` and ``rewards``; ``uses_reference`` says whether reference log-probs are needed."""

    uses_reference = False
    length_normalized = False
    rpo_alpha = None  # weight of RPO's NLL term on the chosen answer, where a loss has one

    def pair_losses(self, pc, pr, rc, rr):
        raise NotImplementedError

    def rewards(self, pc, pr, rc, rr):
        raise NotImplementedError

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, *, ref_hidden=None,
                ref_weight=None, bias=None, ref_bias=None, pair_weights=None, sequence_index=None, n_sequences=None):
        """Padded input: hidden [2B, T, H], labels [2B, T]. Packed input (padding-free): hidden [R, T, H] with
        sequence_index [R, T] naming sequences 0..2B-1 (chosen first) and n_sequences = 2B."""
        if sequence_index is None and isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[0] % 2:
            raise ValueError(f"hidden must hold 2B rows (B chosen, then B rejected), got an odd number: "
                             f"{hidden.shape[0]}")
        if sequence_index is not None and n_sequences is not None and n_sequences % 2:
            raise ValueError(f"n_sequences must be even (B chosen, then B rejected), got {n_sequences}")
        if self._grad_in_forward_applies(hidden, weight, bias):
            from fastalign.fused_grad import preference_forward
            return preference_forward(self, hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                                      ref_weight, bias, ref_bias, pair_weights, sequence_index, n_sequences)
        seq, n_tok = self.sequence_logps(hidden, weight, labels, bias, sequence_index, n_sequences)
        if bool((n_tok == 0).any()):
            i = int((n_tok == 0).nonzero()[0, 0])
            raise ValueError(f"row {i} of labels has no labelled token (all ignore_index): every chosen and "
                             "rejected answer needs at least one token")
        b = seq.shape[0] // 2
        n_tok = n_tok.to(seq.dtype)
        pc, pr = seq[:b], seq[b:]
        nc, nr = n_tok[:b], n_tok[b:]
        rc = rr = None
        if self.uses_reference:
            rc, rr = self._reference(labels, b, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias,
                                     sequence_index, n_sequences)
        if self.length_normalized:
            pc_n, pr_n = pc / nc, pr / nr
            rc_n, rr_n = (rc / nc, rr / nr) if rc is not None else (None, None)
        else:
            pc_n, pr_n, rc_n, rr_n = pc, pr, rc, rr
        losses = self.pair_losses(pc_n, pr_n, rc_n, rr_n)
        nll = None
        if self.rpo_alpha:
            nll = -pc / nc  # mean token NLL of each chosen answer (RPO)
            losses = losses + self.rpo_alpha * nll
        loss = weighted_mean(losses, pair_weights)
        with torch.no_grad():
            cr, rj = self.rewards(pc_n.detach(), pr_n.detach(), None if rc_n is None else rc_n.detach(),
                                  None if rr_n is None else rr_n.detach())
        return PreferenceLossOutput(loss=loss, losses=losses, chosen_logps=pc, rejected_logps=pr, chosen_rewards=cr,
                                    rejected_rewards=rj, reward_margins=cr - rj, reward_accuracies=(cr > rj).float(),
                                    chosen_n_tokens=nc, rejected_n_tokens=nr,
                                    nll_loss=None if nll is None else weighted_mean(nll))

    def _reference(self, labels, b, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias,
                   sequence_index=None, n_sequences=None):
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
            if ref_hidden is not None:
                raise ValueError("pass reference log-probs or ref_hidden/ref_weight, not both")
            for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,):
                    raise ValueError(f"{name} must be a tensor of shape [B] = ({b},), got "
                                     f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            return ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"{type(self).__name__} needs reference log-probs: pass ref_chosen_logps and "
                             "ref_rejected_logps, or ref_hidden and ref_weight")
        if tuple(ref_hidden.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"ref_hidden must be [rows, T, H'] with [rows, T] = {tuple(labels.shape)}, got "
                             f"{tuple(ref_hidden.shape)}")
        with torch.no_grad():  # forward-only fused path: nothing saved for the frozen reference
            seq, _ = self.sequence_logps(ref_hidden, ref_weight, labels, ref_bias, sequence_index, 2 * b)
        return seq[:b], seq[b:]


class FusedDPOLoss(_FusedPreferenceLoss):
    """DPO family on the fused op: ``dpo_loss`` (sigmoid, robust, hinge, ipo) + optional RPO NLL term.

    loss = mean_or_weighted_mean( dpo_loss(...) + rpo_alpha * NLL(chosen) );  rewards = beta (policy - reference).
    IPO uses length-averaged log-probs (Azar et al. 2023).
    """

    uses_reference = True

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=None, **kw):
        super().__init__(**kw)
        check_dpo_options(beta, loss_type, label_smoothing)
        if rpo_alpha is not None:
            _check_positive("rpo_alpha", rpo_alpha)
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha
        self.length_normalized = loss_type == "ipo"

    def pair_losses(self, pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing)

    def rewards(self, pc, pr, rc, rr):
        return self.beta * (pc - rc), self.beta * (pr - rr)


class FusedSimPOLoss(_FusedPreferenceLoss):
    """SimPO (Meng et al. 2024): ``simpo_loss`` on length-averaged log-probs; rewards = beta * avg log-prob."""

    length_normalized = True

    def __init__(self, beta=2.0, gamma=0.5, label_smoothing=0.0, **kw):
        super().__init__(**kw)
        _check_positive("beta", beta)
        _check_label_smoothing(label_smoothing, "sigmoid")
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def pair_losses(self, pc, pr, rc, rr):
        return simpo_loss(pc, pr, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)

    def rewards(self, pc, pr, rc, rr):
        return self.beta * pc, self.beta * pr


class FusedORPOLoss(_FusedPreferenceLoss):
    """ORPO (Hong et al. 2024): ``orpo_loss`` on length-averaged log-probs; rewards = beta * avg log-prob."""

    length_normalized = True

    def __init__(self, lam=0.1, beta=0.1, **kw):
        super().__init__(**kw)
        _check_positive("lam", lam)
        _check_positive("beta", beta)
        self.lam, self.beta = lam, beta

    def pair_losses(self, pc, pr, rc, rr):
        return orpo_loss(pc, pr, lam=self.lam)

    def rewards(self, pc, pr, rc, rr):
        return self.beta * pc, self.beta * pr


class FusedSFTLoss(_FusedLogprobs):
    """Supervised fine-tuning on demonstrations: ``sft_loss``, the mean token NLL (forward KL to the data).

    hidden [B, T, H], labels [B, T] aligned, ``ignore_index`` on prompt and padding.
    """

    def forward(self, hidden, weight, labels, *, bias=None, sequence_index=None, n_sequences=None):
        if self._grad_in_forward_applies(hidden, weight, bias):
            from fastalign.fused_grad import sft_forward
            return sft_forward(self, hidden, weight, labels, bias, sequence_index, n_sequences)
        seq, n_tok = self.sequence_logps(hidden, weight, labels, bias, sequence_index, n_sequences)
        return SFTLossOutput(loss=sft_loss(seq, n_tok), sequence_logps=seq, n_tokens=n_tok)


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
