"""The fused loss modules: ``FusedDPOLoss``, ``FusedSimPOLoss``, ``FusedORPOLoss`` and ``FusedSFTLoss``.

Each is an nn.Module that takes hidden states and the lm_head weight (never the logits), runs the fused
linear -> token log-prob op to per-sequence log-probs (padded or packed rows) and applies the matching functional
loss of ``fastalign.losses`` to them; the preference losses also return per-pair rewards, margins and accuracies
(``PreferenceLossOutput``), and all of them can take the gradient-in-forward path (``fastalign.fused_grad``).
``fastalign.losses`` re-exports every name here and imports this module at its end, so import the classes from
either place.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from fastalign.losses import (_check_label_smoothing, _check_positive, check_dpo_options, check_token_inputs, dpo_loss,
                              orpo_loss, sft_loss, simpo_loss, weighted_mean)
from fastalign.ops import linear_logprobs, sequence_logprobs


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
