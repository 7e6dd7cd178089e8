"""Batching: tokenized examples -> padded or packed (padding-free) ``Batch`` tensors."""
from dataclasses import dataclass
from typing import List, Optional

import torch

from fastalign.data.tokenize import IGNORE_INDEX


@dataclass
class Batch:
    """input_ids/labels/attention_mask [rows, T]. Padded: rows are sequences. Packed (padding_free): rows hold
    several sequences; position_ids restart per sequence, sequence_index [rows, T] names each token's
    sequence (-1 on padding), and attention_mask is an additive block-diagonal causal mask [rows, 1, T, T]
    unless flash-attn's varlen path is used (then None)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor] = None
    sequence_index: Optional[torch.Tensor] = None
    n_sequences: int = 0
    weights: Optional[torch.Tensor] = None  # per-pair weights; None when every pair weighs 1
    margins: Optional[torch.Tensor] = None  # per-pair reward margins (TRL's reward data); None when all are 0
    behaviours: Optional[List] = None
    indices: Optional[List[int]] = None

    def to(self, device):
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(**{k: move(v) for k, v in self.__dict__.items()})


def _pad(seqs, value):
    t = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (t - len(s)) for s in seqs], dtype=torch.long)


def collate_sequences(ids, labels, pad_id, padding_free=False, use_4d_mask=True, mask_dtype=torch.float32):
    """Sequences -> Batch. padding_free packs every sequence into one row."""
    if not padding_free:
        input_ids = _pad(ids, pad_id)
        lab = _pad(labels, IGNORE_INDEX)
        mask = _pad([[1] * len(s) for s in ids], 0)
        return Batch(input_ids=input_ids, labels=lab, attention_mask=mask, n_sequences=len(ids))
    flat_ids, flat_labels, pos, seq_idx = [], [], [], []
    for k, (s, lab) in enumerate(zip(ids, labels)):
        flat_ids += s
        flat_labels += lab
        pos += list(range(len(s)))
        seq_idx += [k] * len(s)
    input_ids = torch.tensor([flat_ids])
    seq = torch.tensor([seq_idx])
    mask = None
    if use_4d_mask:
        n = len(flat_ids)
        same = seq[0][:, None] == seq[0][None, :]
        causal = torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.zeros(n, n, dtype=mask_dtype).masked_fill_(~(same & causal), torch.finfo(mask_dtype).min)
        mask = mask[None, None]
    return Batch(input_ids=input_ids, labels=torch.tensor([flat_labels]), attention_mask=mask,
                 position_ids=torch.tensor([pos]), sequence_index=seq, n_sequences=len(ids))


def collate_preference(examples, pad_id, padding_free=False, use_4d_mask=True, mask_dtype=torch.float32):
    """Pairs -> one Batch with chosen sequences 0..B-1 and rejected B..2B-1 (one forward for both)."""
    ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    b = collate_sequences(ids, labels, pad_id, padding_free, use_4d_mask, mask_dtype)
    # all-ones weights are the plain mean: leave them out here, where it costs no device synchronisation
    if any(e["weight"] != 1.0 for e in examples):
        b.weights = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
    if any(e.get("margin", 0.0) != 0.0 for e in examples):
        b.margins = torch.tensor([e.get("margin", 0.0) for e in examples], dtype=torch.float32)
    b.behaviours = [e.get("behaviour") for e in examples]
    b.indices = [e["index"] for e in examples]
    return b


def collate_sft(examples, pad_id, padding_free=False, use_4d_mask=True, mask_dtype=torch.float32):
    b = collate_sequences([e["ids"] for e in examples], [e["labels"] for e in examples], pad_id, padding_free,
                          use_4d_mask, mask_dtype)
    b.behaviours = [e.get("behaviour") for e in examples]
    b.indices = [e["index"] for e in examples]
    return b
