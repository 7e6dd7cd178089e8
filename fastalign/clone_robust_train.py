"""Clone-robust training: per-pair weights w(chosen) * w(rejected) from the alternatives' Voronoi weights.

Called once by the reward and DPO-family trainers when ``clone_robust=True`` (before any training step):
each distinct answer sequence is an alternative, grouped by prompt (``clone_robust_group_by="prompt"``, so a
prompt's answers compete only with each other) or all in one group ("none"); its embedding comes from an
encoder; ``clone_robust_weights`` gives w; every training pair's weight is multiplied by w(chosen) * w(rejected),
rescaled by one constant so that the mean pair weight is 1 (the learning rate keeps its meaning). Weights are
cached on disk keyed by the data and the encoder's fingerprint.

Encoders (``clone_robust_encoder``): None or "model": the model's own final hidden state, mean over the
answer's tokens (one no-grad batched pass); "ngram": hashed character 3-gram counts of the answer text (no
model; finds near-duplicate texts); a local folder: a sentence-transformers model (when that package is
installed); or any callable ``texts -> [n, d]`` (answer texts).
"""
import hashlib
import json
import os

import torch

from fastalign.clone_robust import clone_robust_weights

IGNORE_INDEX = -100
NGRAM_DIM = 256


def alternatives_of(examples):
    """(alternatives: list of (ids, labels), group id per alternative [A], chosen index [P], rejected index [P]).
    An alternative is a distinct token sequence; its group is its prompt (the tokens before the answer)."""
    index, seqs, prompt_ids = {}, [], {}
    groups, chosen, rejected = [], [], []
    for e in examples:
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = e[f"{side}_ids"], e[f"{side}_labels"]
            key = tuple(ids)
            if key not in index:
                prompt = tuple(i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX)
                index[key] = len(seqs)
                seqs.append((ids, labels))
                groups.append(prompt_ids.setdefault(prompt, len(prompt_ids)))
            out.append(index[key])
    return seqs, torch.tensor(groups), torch.tensor(chosen), torch.tensor(rejected)


def _answer_texts(seqs, tokenizer):
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX and t not in special])
            for ids, labels in seqs]


def ngram_embeddings(texts, dim=NGRAM_DIM):
    """Hashed character 3-gram counts [n, dim], L2-normalized (stable across runs: md5, not Python's hash)."""
    out = torch.zeros(len(texts), dim, dtype=torch.float64)
    for row, text in enumerate(texts):
        padded = f"  {text} "
        for i in range(len(padded) - 2):
            h = int.from_bytes(hashlib.md5(padded[i:i + 3].encode()).digest()[:4], "little")
            out[row, h % dim] += 1.0
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def model_embeddings(model, seqs, pad_id, batch_size=16, device=None, progress=None):
    """Mean final hidden state over each answer's tokens [A, H] (float32), one no-grad pass in batches."""
    from fastalign.integrations.hf import _unwrap, run_trunk, trunk_of
    inner = _unwrap(model)
    trunk = trunk_of(inner)
    device = device or next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    out = []
    try:
        starts = range(0, len(seqs), batch_size)
        for i in (progress(starts, "clone-robust embeddings") if progress else starts):
            chunk = seqs[i:i + batch_size]
            t = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([s + [pad_id] * (t - len(s)) for s, _ in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s, _ in chunk], device=device)
            answer = torch.tensor([[float(lab != IGNORE_INDEX) for lab in labs] + [0.0] * (t - len(labs))
                                   for _, labs in chunk], device=device)
            hidden = run_trunk(trunk, input_ids=ids, attention_mask=mask).last_hidden_state.float()
            out.append(((hidden * answer[..., None]).sum(1) / answer.sum(1, keepdim=True).clamp_min(1)).cpu())
    finally:
        inner.train(was_training)
    return torch.cat(out)


def _encoder_fingerprint(encoder, model):
    h = hashlib.sha256()
    if encoder in (None, "model"):
        from fastalign.integrations.hf import hash_model
        hash_model(h, model)
    elif callable(encoder):
        h.update(str(getattr(encoder, "fingerprint", f"{getattr(encoder, '__module__', '')}."
                                                      f"{getattr(encoder, '__qualname__', type(encoder))}")).encode())
    elif isinstance(encoder, str) and os.path.isdir(encoder):
        for root, _, files in sorted(os.walk(encoder)):
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"{os.path.relpath(os.path.join(root, f), encoder)}{st.st_size}{st.st_mtime_ns}".encode())
    else:
        h.update(str(encoder).encode())
    return h.hexdigest()


def embed(seqs, encoder, model, tokenizer, progress=None, device=None):
    """Embeddings [A, d] of the alternatives with the chosen encoder (see the module docstring)."""
    if encoder in (None, "model"):
        if model is None:
            raise ValueError("clone_robust_encoder='model' needs a model; pass --model or use encoder 'ngram'")
        return model_embeddings(model, seqs, tokenizer.pad_token_id, progress=progress, device=device)
    texts = _answer_texts(seqs, tokenizer)
    if encoder == "ngram":
        return ngram_embeddings(texts)
    if callable(encoder):
        return torch.as_tensor(encoder(texts))
    if isinstance(encoder, str) and os.path.isdir(encoder):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError(f"clone_robust_encoder={encoder!r} is a folder: reading it needs the "
                              "sentence-transformers package (`pip install sentence-transformers`)") from None
        return torch.as_tensor(SentenceTransformer(encoder, device="cpu").encode(texts, convert_to_numpy=True))
    raise ValueError(f"clone_robust_encoder must be None/'model', 'ngram', a local sentence-transformers folder "
                     f"or a callable, got {encoder!r}")


def alternative_weights(examples, *, encoder=None, model=None, tokenizer=None, group_by="prompt", dim=8,
                        num_samples=100_000, seed=0, backend="auto", cache_dir=None, progress=None, device=None):
    """(per-alternative weights [A], alternatives, chosen index [P], rejected index [P]) of tokenized pairs."""
    seqs, groups, chosen, rejected = alternatives_of(examples)
    if group_by == "none":
        groups = torch.zeros_like(groups)
    elif group_by != "prompt":
        raise ValueError(f"clone_robust_group_by must be 'prompt' or 'none', got {group_by!r}")
    h = hashlib.sha256(json.dumps([seqs, groups.tolist(), group_by, dim, num_samples, seed]).encode())
    h.update(_encoder_fingerprint(encoder, model).encode())
    path = os.path.join(cache_dir, f"clone_weights-{h.hexdigest()[:20]}.safetensors") if cache_dir else None
    if path and os.path.isfile(path):
        from safetensors.torch import load_file
        return load_file(path)["weights"], seqs, chosen, rejected
    emb = embed(seqs, encoder, model, tokenizer, progress=progress, device=device).to(torch.float64).cpu()
    weights = torch.ones(len(seqs), dtype=torch.float32)
    sizes = torch.bincount(groups)
    multi = sizes[groups] >= 2  # a prompt with a single distinct answer has nothing to share its space with
    if multi.any():
        weights[multi] = clone_robust_weights(emb[multi], num_samples=num_samples, groups=groups[multi],
                                              dim=dim if dim and dim < emb.shape[1] else None, seed=seed,
                                              backend=backend).cpu()
    if path:
        from safetensors.torch import save_file
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"weights": weights}, tmp)
        os.replace(tmp, path)
    return weights, seqs, chosen, rejected


def pair_weights(weights, chosen, rejected):
    """w(chosen) * w(rejected) [P], scaled by one constant to mean 1."""
    w = weights[chosen] * weights[rejected]
    mean = float(w.mean())
    return w / mean if mean > 0 else torch.ones_like(w)


def apply_to_trainer(trainer):
    """The trainers' hook: multiply each training pair's weight by its clone-robust pair weight."""
    cfg = trainer.config
    cache_dir = cfg.clone_robust_cache_dir or os.path.join(cfg.output_dir, "clone_robust_cache")
    weights, _, chosen, rejected = alternative_weights(
        trainer.train_examples, encoder=cfg.clone_robust_encoder, model=trainer.model, tokenizer=trainer.tokenizer,
        group_by=cfg.clone_robust_group_by, dim=cfg.clone_robust_dim, num_samples=cfg.clone_robust_num_samples,
        seed=cfg.seed,
        cache_dir=cache_dir if trainer.is_main else None, progress=trainer._progress, device=trainer.device)
    pw = pair_weights(weights, chosen, rejected)
    for e, w in zip(trainer.train_examples, pw.tolist()):
        e["weight"] = e["weight"] * w
    trainer.clone_robust_alternative_weights = weights
    return pw
