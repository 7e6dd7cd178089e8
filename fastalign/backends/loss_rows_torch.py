"""PyTorch row passes of the gradient-in-forward loss path; the contract is in loss_rows_cpp.py."""
import torch


# A bf16/fp16 tile is worked on in fp32 one vocabulary block of about this many elements at a time: a widened copy
# of the whole tile would hold three times the tile's own memory (this pass also runs the fused losses on CUDA).
WIDEN_BLOCK_ELEMENTS = 1 << 22


def rows_logsumexp_(tile, targets, opts):
    if tile.dtype in (torch.bfloat16, torch.float16):  # statistics in fp32, exp(l - shift) back in the tile's type
        if opts.softcap is not None:  # not in the contract (a softcap takes an fp32 tile); kept correct anyway
            wide = tile.float()
            logp, lse, shift = rows_logsumexp_(wide, targets, opts)
            tile.copy_(wide)
            return logp, lse, shift
        shift = tile.amax(dim=0).float()
        picked = tile.gather(0, targets.clamp_min(0).unsqueeze(0)).squeeze(0).float()
        total = torch.zeros_like(shift)
        step = max(1, WIDEN_BLOCK_ELEMENTS // max(tile.shape[1], 1))
        for s in range(0, tile.shape[0], step):
            block = tile[s:s + step].float().sub_(shift.unsqueeze(0)).exp_()
            total.add_(block.sum(0))
            tile[s:s + step].copy_(block)
        lse = shift + total.log()
        return torch.where(targets >= 0, picked - lse, torch.zeros_like(lse)), lse, shift
    if opts.softcap is not None:
        tile.div_(opts.softcap).tanh_().mul_(opts.softcap)
    picked = tile.gather(0, targets.clamp_min(0).unsqueeze(0)).squeeze(0)
    if opts.softcap is not None:  # the tile keeps l for c'(l) in rows_dlogits_
        lse = torch.logsumexp(tile, dim=0)
        shift = torch.zeros_like(lse)
    else:  # the tile becomes exp(l - shift)
        shift = tile.amax(dim=0)
        lse = shift + tile.sub_(shift.unsqueeze(0)).exp_().sum(0).log_()
    return torch.where(targets >= 0, picked - lse, torch.zeros_like(lse)), lse, shift


def rows_dlogits_(tile, lse, shift, targets, coeff, opts):
    g = torch.where(targets >= 0, coeff.to(tile.dtype), torch.zeros_like(lse)) / opts.temperature
    chain = None
    if opts.softcap is not None:  # c'(l) = 1 - (l / c)^2, taken before the tile is overwritten
        chain = 1.0 - (tile / opts.softcap) ** 2
        tile.sub_(lse.unsqueeze(0)).exp_()
    else:  # the tile holds exp(l - shift)
        tile.mul_(torch.exp(shift - lse).unsqueeze(0))
    tile.mul_(-g.unsqueeze(0))
    tile.scatter_add_(0, targets.clamp_min(0).unsqueeze(0), g.unsqueeze(0))
    if chain is not None:
        tile.mul_(chain)
