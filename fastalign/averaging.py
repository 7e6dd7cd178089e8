"""Model averaging against the alignment tax (Lin et al. 2023, "Mitigating the Alignment Tax of RLHF").

Plain averaging:  theta = a * theta_pre + (1 - a) * theta_post, with ``a = weight_on_pre`` in [0, 1].
The ratio is always named ``weight_on_pre`` (the weight of the model *before* alignment), because the
literature uses both conventions: a = 0 is the aligned model, a = 1 the model before alignment.

Heterogeneous Model Averaging (HMA): the layers are split into K contiguous groups (embeddings in the first,
the decoder blocks spread over all K, the final norm and lm_head in the last); group k uses its own a_k, with
mean(a_k) = weight_on_pre and 0 <= a_k <= 1. The ratios can be fitted to maximize the averaged model's
log-likelihood of alignment data: ``fit_hma_ratios`` (``fastalign.hma_fit``, re-exported here).
"""
import copy
import numbers
import re
from collections import OrderedDict
from typing import List, Mapping, Sequence

import torch

from fastalign._lazy import lazy_attributes
from fastalign.integrations.hf import is_peft

# The first "<prefix>.<index>." in a parameter name: decoder blocks live in a ModuleList such as model.layers.
_BLOCK = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.")
# Names that belong to the input side when the order of names is unknown (safetensors files sort their keys).
_INPUT_SIDE = re.compile(r"(embed|wte|wpe|word_embeddings|tok_embeddings|position_embeddings)")


class AveragingError(ValueError):
    """Two models (or checkpoints) cannot be averaged: the message names the first mismatch."""


# ---- inputs ---------------------------------------------------------------------------------------------

def check_weight_on_pre(value, name="weight_on_pre"):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (the weight of the pre-alignment model), got {value!r}")
    return float(value)


def _check_groups(groups):
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive integer (the number of layer groups K), got {groups!r}")
    return int(groups)


def _as_state(x, name):
    """(ordered state dict, module or None) of a model or a state dict."""
    if isinstance(x, torch.nn.Module):
        if is_peft(x):
            raise AveragingError(f"{name} is a peft (LoRA) model: merge its adapters into the weights first "
                                 "(model = model.merge_and_unload()) and average the merged models")
        return x.state_dict(), x
    if isinstance(x, Mapping):
        bad = next((k for k, v in x.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise TypeError(f"{name} is a mapping but {name}[{bad!r}] is a {type(x[bad]).__name__}, not a tensor")
        return OrderedDict(x), None
    raise TypeError(f"{name} must be a torch.nn.Module or a state dict (mapping of name -> tensor), "
                    f"got {type(x).__name__}")


def check_compatible(pre_sd, post_sd, pre_name="pre", post_name="post"):
    """Same tensor names, shapes and dtypes; raise AveragingError naming the first mismatch."""
    missing = [k for k in post_sd if k not in pre_sd]
    extra = [k for k in pre_sd if k not in post_sd]
    if missing or extra:
        first = missing[0] if missing else extra[0]
        where = pre_name if missing else post_name
        raise AveragingError(f"the models have different tensors: {first!r} is missing from {where} "
                             f"({len(missing)} missing from {pre_name}, {len(extra)} missing from {post_name}); "
                             "averaging needs two checkpoints of one architecture")
    for k, post_t in post_sd.items():
        pre_t = pre_sd[k]
        if tuple(pre_t.shape) != tuple(post_t.shape):
            raise AveragingError(f"tensor {k!r} has shape {tuple(pre_t.shape)} in {pre_name} but "
                                 f"{tuple(post_t.shape)} in {post_name}")
        if pre_t.dtype != post_t.dtype:
            raise AveragingError(f"tensor {k!r} is {pre_t.dtype} in {pre_name} but {post_t.dtype} in {post_name}; "
                                 "cast both models to one dtype first")


def mix(pre_t, post_t, a):
    """a * pre + (1 - a) * post in at least fp32, cast back to the tensor's dtype; exact at a = 0 and a = 1.
    Integer and boolean tensors (buffers such as position ids) are not averaged: they keep post's values."""
    if not post_t.is_floating_point():
        return post_t.clone()
    if a == 0.0:
        return post_t.clone()
    if a == 1.0:
        return pre_t.clone()
    work = torch.promote_types(post_t.dtype, torch.float32)
    out = post_t.to(work).mul(1.0 - a).add_(pre_t.to(work), alpha=a)
    return out.to(post_t.dtype)


def _averaged(pre, post, ratio_of_key):
    pre_sd, pre_mod = _as_state(pre, "pre")
    post_sd, post_mod = _as_state(post, "post")
    if pre_mod is not None and post_mod is not None and type(pre_mod) is not type(post_mod):
        raise AveragingError(f"pre is a {type(pre_mod).__name__} but post is a {type(post_mod).__name__}; "
                             "averaging needs two checkpoints of one architecture")
    if (pre_mod is None) != (post_mod is None):
        raise TypeError("pass two models or two state dicts, not one of each")
    check_compatible(pre_sd, post_sd)
    keys = list(post_sd)
    if post_mod is None:
        return OrderedDict((k, mix(pre_sd[k], post_sd[k], ratio_of_key(k))) for k in keys)
    result = copy.deepcopy(post_mod)
    target = result.state_dict(keep_vars=True)
    with torch.no_grad():
        for k in keys:
            target[k].copy_(mix(pre_sd[k], post_sd[k], ratio_of_key(k)))
    return result


def average_models(pre, post, *, weight_on_pre):
    """theta = weight_on_pre * theta_pre + (1 - weight_on_pre) * theta_post (Lin et al. 2023).

    pre, post: two models (nn.Module of one class) or two state dicts with the same names, shapes and dtypes.
    Returns the same kind: a new model (a copy of ``post`` holding the averaged weights) or a new state dict;
    the inputs are untouched. Computed in fp32 (fp64 for fp64 tensors) and cast back to each tensor's dtype;
    exact at weight_on_pre = 0 (post) and 1 (pre). Integer buffers keep post's values.
    """
    a = check_weight_on_pre(weight_on_pre)
    return _averaged(pre, post, lambda _k: a)


# ---- layer groups ---------------------------------------------------------------------------------------

def _block_prefix(names):
    """The ModuleList prefix holding the decoder blocks: the '<prefix>.<i>.' with the most distinct indices."""
    found = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            found.setdefault(m.group("prefix"), set()).add(int(m.group("index")))
    if not found:
        return None
    return max(found, key=lambda p: (len(found[p]), -len(p)))


def group_of_names(names: Sequence[str], groups: int = 3, ordered: bool = True):
    """{name: group index} for K contiguous groups: decoder blocks split as evenly as possible (later groups
    take the extra block), names before the blocks (embeddings) in group 0, names after them (final norm,
    lm_head) in group K-1. ``ordered=False`` when the names' order is not the model's (safetensors sorts
    keys): non-block names are then placed by name (embeddings first, everything else last). Raises ValueError
    for more groups than decoder blocks (a group would hold no block)."""
    k = _check_groups(groups)
    names = list(names)
    prefix = _block_prefix(names)
    index_of = {}
    blocks = []
    if prefix is not None:
        pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        for n in names:
            m = pat.match(n)
            if m:
                index_of[n] = int(m.group(1))
        blocks = sorted(set(index_of.values()))
    nb = len(blocks)
    if k > max(nb, 1):
        # a group without a block would hold no parameter (or only the embeddings), yet its ratio would count
        # toward the mean: the average would not be the one asked for
        raise ValueError(f"HMA with {k} layer groups needs at least {k} decoder blocks, but the model has {nb} "
                         f"({'under ' + repr(prefix) if prefix else 'no numbered block list found'}); "
                         f"use at most {max(nb, 1)} group(s)")
    # blocks -> groups: contiguous, sizes differ by at most one
    block_group = {}
    for g in range(k):
        lo, hi = (g * nb) // k, ((g + 1) * nb) // k
        for b in blocks[lo:hi]:
            block_group[b] = g
    last_block_pos = max((i for i, n in enumerate(names) if n in index_of), default=-1)
    out = {}
    seen_block = False
    last_group = 0
    for i, n in enumerate(names):
        if n in index_of:
            seen_block = True
            last_group = block_group[index_of[n]]
            out[n] = last_group
        elif not ordered:
            out[n] = 0 if _INPUT_SIDE.search(n) else k - 1
        elif not seen_block:
            out[n] = 0
        else:  # after the last block: final norm, lm_head; between blocks: the preceding block's group
            out[n] = k - 1 if i > last_block_pos else last_group
    return out


def _canonical_names(model):
    """{state-dict key: name of the tensor that owns its storage} so tied tensors (lm_head tied to the
    embeddings) follow their owner, which is the first name in registration order (the embedding)."""
    owner = {}
    canonical = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        canonical[name] = owner.setdefault(id(t), name)
    return canonical


def hma_groups(model, groups=3) -> List[List[str]]:
    """The K contiguous layer groups of HMA as lists of parameter names (``model.named_parameters()``): every
    parameter in exactly one group. Group 0 holds the embeddings and the first decoder blocks, group K-1 the
    last blocks, the final norm and the lm_head. A tied lm_head shares the embedding's tensor, which appears
    once (under the embedding's name) and is owned by group 0: its ratio is group 0's.
    Every group holds at least one decoder block: more groups than blocks are refused (ValueError)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    k = _check_groups(groups)
    names = [n for n, _ in model.named_parameters()]
    where = group_of_names(names, k)
    out = [[] for _ in range(k)]
    for n in names:
        out[where[n]].append(n)
    return out


def _ratio_lookup(model_or_names, groups, ratios, ordered=True):
    """key -> a_k for every state-dict key of a model (tied keys follow their owner), or for a list of names."""
    if isinstance(model_or_names, torch.nn.Module):
        canonical = _canonical_names(model_or_names)
        # parameters decide the groups (as hma_groups shows them); buffers are placed among all names
        where = group_of_names([n for n, _ in model_or_names.named_parameters()], groups)
        where_all = group_of_names(list(dict.fromkeys(canonical.values())), groups)
        return lambda key: ratios[where.get(canonical.get(key, key), where_all.get(canonical.get(key, key), 0))]
    where = group_of_names(list(model_or_names), groups, ordered=ordered)
    return lambda key: ratios[where[key]]


def check_ratios(ratios, groups, weight_on_pre, tol=1e-6):
    k = _check_groups(groups)
    if isinstance(ratios, torch.Tensor):
        ratios = ratios.tolist()
    try:
        ratios = [float(r) for r in ratios]
    except (TypeError, ValueError):
        raise TypeError(f"ratios must be a sequence of {k} numbers, got {ratios!r}") from None
    if len(ratios) != k:
        raise ValueError(f"ratios must hold one ratio per group: groups={k}, got {len(ratios)} ratios {ratios}")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"every ratio must be in [0, 1] (weights on the pre-alignment model), got {ratios}")
    mean = sum(ratios) / k
    if abs(mean - weight_on_pre) > tol:
        raise ValueError(f"the ratios' mean must equal weight_on_pre={weight_on_pre}: got mean {mean:.6g} of {ratios}")
    return ratios


def hma(pre, post, *, weight_on_pre, groups=3, ratios=None):
    """Heterogeneous Model Averaging: group k of layers (see ``hma_groups``) is averaged with its own ratio a_k,
    theta_k = a_k * theta_pre_k + (1 - a_k) * theta_post_k, with mean(a_k) = weight_on_pre and a_k in [0, 1].

    ratios: K numbers (weights on the pre-alignment model, bottom group first), or None for a_k = weight_on_pre
    everywhere (plain averaging); ``fit_hma_ratios`` fits them. Models or state dicts, as ``average_models``;
    for state dicts the groups come from the keys' order (the model's named order is assumed).
    """
    a = check_weight_on_pre(weight_on_pre)
    k = _check_groups(groups)
    ratios = [a] * k if ratios is None else check_ratios(ratios, k, a)
    ref = post if isinstance(post, torch.nn.Module) else list(_as_state(post, "post")[0])
    return _averaged(pre, post, _ratio_lookup(ref, k, ratios))


# ---- fitting the ratios: fastalign.hma_fit, which imports the names above; importable from here (the same objects)
# through a module __getattr__, so neither module imports the other at import time ----------------------------------
_MOVED_TO_HMA_FIT = ("_AveragedModel", "_encode_rows", "_nll", "_pad_id", "fit_hma_ratios", "hma_ratio_grad",
                     "project_ratios", "prompt_and_answer")


__getattr__ = lazy_attributes(__name__, dict.fromkeys(_MOVED_TO_HMA_FIT, "fastalign.hma_fit"))


__all__ = ["average_models", "hma", "hma_groups", "fit_hma_ratios", "hma_ratio_grad", "project_ratios",
           "group_of_names", "check_compatible", "check_weight_on_pre", "AveragingError", "mix"]
