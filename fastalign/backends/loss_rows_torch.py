"""PyTorch row passes of the gradient-in-forward loss path; the contract is in loss_rows_cpp.py. Between the two
calls the tile holds l (after the softcap); shift is unused here (zeros)."""
import torch


def rows_logsumexp_(tile, targets, opts):
    if opts.softcap is not None:
        tile.div_(opts.softcap).tanh_().mul_(opts.softcap)
    lse = torch.logsumexp(tile, dim=-1)
    picked = tile.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(targets >= 0, picked - lse, torch.zeros_like(lse)), lse, torch.zeros_like(lse)


def rows_dlogits_(tile, lse, shift, targets, coeff, opts):
    g = torch.where(targets >= 0, coeff.to(tile.dtype), torch.zeros_like(lse)) / opts.temperature
    chain = None
    if opts.softcap is not None:  # c'(l) = 1 - (l / c)^2, taken before the tile is overwritten
        chain = 1.0 - (tile / opts.softcap) ** 2
    tile.sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
    tile.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), g.unsqueeze(1))
    if chain is not None:
        tile.mul_(chain)
