"""Alignment from demonstrations (Sun and van der Schaar, 2024): the reward-model rows and the resumable pipeline.

    1. SFT the initial model on the demonstrations          (fastalign train sft)
    2. sample answers from the initial and the SFT model     (stages samples-init, samples-sft)
    3. train the discriminator reward model (BCE)            (stage reward-model)
    4. Best-of-N from the SFT model under that reward        (stage best-of-n)

Each finished stage writes an atomic done-file (``stages/<stage>.done``, the stage's settings): a rerun skips
it, and a rerun with different settings in the same output folder is refused.
"""
import hashlib
import json
import os
import random

import torch

from fastalign import checkpoint as ckpt
from fastalign.config import ConfigError
from fastalign.data import DataError, is_nonempty, load_rows
from fastalign.generation import read_jsonl, sample, write_jsonl
from fastalign.scoring import _check_same_tokenizer, best_of_n
from fastalign.trainers.afd_reward import RM_KINDS, AfDRewardConfig
from fastalign.trainers.runlog import OutputDirLock

STAGES = ("samples-init", "samples-sft", "reward-model", "best-of-n")


def _answer(row):
    for k in ("completion", "answer", "chosen"):
        if k in row:
            return row[k]
    raise KeyError("completion")


def load_demos(data):
    """Demonstrations: rows with prompt and completion (or answer, or chosen)."""
    try:
        rows = load_rows(data)
    except ValueError as exc:
        raise DataError(f"demonstrations {data if isinstance(data, str) else ''}: {exc}") from None
    bad = [i for i, r in enumerate(rows)
           if "prompt" not in r or not any(k in r for k in ("completion", "answer", "chosen"))
           or not is_nonempty(r["prompt"])]
    if bad:
        raise DataError(f"demonstrations: row {bad[0]} (and {len(bad) - 1} more) needs a non-empty prompt and a "
                        f"completion (or answer, or chosen); found keys {sorted(rows[bad[0]])}")
    return [{"prompt": r["prompt"], "completion": _answer(r)} for r in rows]


def load_prompts(data):
    """Prompts: a .jsonl/.json of rows with a prompt field, or a list of prompts / rows. Duplicates kept."""
    where = data if isinstance(data, str) else "prompts"
    if isinstance(data, (list, tuple)) and data and not isinstance(data[0], dict):
        rows = [{"prompt": p} for p in data]
    else:
        try:
            rows = load_rows(data)
        except ValueError as exc:
            raise DataError(f"{where}: {exc} (expected one {{\"prompt\": ...}} object per line)") from None
    prompts = []
    for i, r in enumerate(rows):
        if "prompt" not in r or not is_nonempty(r["prompt"]):
            raise DataError(f"{where}: row {i} needs a non-empty prompt field; found keys {sorted(r)}")
        prompts.append(r["prompt"])
    return prompts


def reward_rows(rm_kind, *, demos=None, init_samples=None, sft_samples=None):
    """(prompt, answer, label) rows for AfDRewardTrainer: positives (label 1) and negatives (label 0) by kind:
    init-sft = SFT samples vs initial-model samples; init-demo = demonstrations vs initial-model samples;
    sft-demo = demonstrations vs SFT samples. Inputs are rows with prompt and completion."""
    if rm_kind not in RM_KINDS:
        raise ConfigError(f"unknown rm_kind {rm_kind!r}; valid: {', '.join(RM_KINDS)}")
    given = {"demo": demos, "init": init_samples, "sft": sft_samples}
    names = {"demo": "demos", "init": "init_samples", "sft": "sft_samples"}
    out = []
    for label, part in zip((1, 0), RM_KINDS[rm_kind]):
        rows = given[part]
        if not rows:
            raise ValueError(f"rm_kind={rm_kind!r} needs {names[part]} ({'positives' if label else 'negatives'})")
        out += [{"prompt": r["prompt"], "answer": _answer(r), "label": label, "source": part} for r in rows]
    return out


def split_by_prompt(rows, eval_fraction, seed=0):
    """(train, eval) with every prompt's rows on one side (no prompt leaks into the held-out set)."""
    keys = sorted({json.dumps(r["prompt"], sort_keys=True) for r in rows})
    random.Random(seed).shuffle(keys)
    held = set(keys[:int(round(eval_fraction * len(keys)))])
    train = [r for r in rows if json.dumps(r["prompt"], sort_keys=True) not in held]
    held_rows = [r for r in rows if json.dumps(r["prompt"], sort_keys=True) in held]
    return train, held_rows


# ---- the resumable pipeline -------------------------------------------------------------------------

class Stages:
    """Done-files under ``<output_dir>/stages``: a stage is done when its file exists with the same settings."""

    def __init__(self, output_dir):
        self.dir = os.path.join(output_dir, "stages")

    def _path(self, stage):
        return os.path.join(self.dir, f"{stage}.done")

    def done(self, stage, settings):
        path = self._path(stage)
        if not os.path.exists(path):
            return False
        with open(path) as f:
            recorded = json.load(f)
        if recorded != json.loads(json.dumps(settings)):
            diff = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            raise ConfigError(f"{os.path.dirname(self.dir)} already holds stage {stage!r} made with other settings "
                              f"(differ: {', '.join(diff)}); use a new --output-dir, or delete {path} to redo it")
        return True

    def mark(self, stage, settings):
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{self._path(stage)}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(stage))


def _file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_causal_lm(path):
    import transformers
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is not a local directory written by save_pretrained "
                                "(fastalign never downloads)")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.to(_device()), tok


def load_reward_model(path, tokenizer=None):
    import transformers
    if not os.path.isdir(path):
        raise FileNotFoundError(f"reward model {path!r} is not a local directory written by save_pretrained")
    tok = tokenizer or transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, tok


def run_afd(init_model, sft_model, demos, prompts=None, *, output_dir, rm_kind="init-sft", n=16, rm_base=None,
            samples_per_prompt=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0, batch_size=16,
            rm_options=None, show_progress=True, log=print):
    """Steps 2-4 of AfD from local model folders and JSONL files; returns the paths it wrote.

    init_model, sft_model: save_pretrained folders (same tokenizer). demos: demonstrations JSONL (prompt,
    completion); the reward model's samples are drawn on their prompts. prompts: JSONL of prompts to answer
    with Best-of-N (default: the demonstrations' prompts). rm_base: folder the reward model starts from
    (default: init_model). rm_options: AfDRewardConfig fields.
    """
    if rm_kind not in RM_KINDS:
        raise ConfigError(f"unknown rm_kind {rm_kind!r}; valid: {', '.join(RM_KINDS)}")
    for name, value in (("n", n), ("samples_per_prompt", samples_per_prompt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    demo_rows = load_demos(demos)
    bon_prompts = load_prompts(prompts) if prompts is not None else [r["prompt"] for r in demo_rows]
    demo_prompts = [r["prompt"] for r in demo_rows]
    rm_base = rm_base or init_model
    # two runs never share an output folder (the stages' files would interleave): held until the last stage ends
    with OutputDirLock(output_dir):
        stages = Stages(output_dir)
        gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        data_id = {"demos": _file_hash(demos) if isinstance(demos, str) else None,
                   "prompts": _file_hash(prompts) if isinstance(prompts, str) else None}
        paths = {k: os.path.join(output_dir, f) for k, f in (
            ("init", "samples_init.jsonl"), ("sft", "samples_sft.jsonl"), ("rm", "reward_model"),
            ("bon", "best_of_n.jsonl"), ("rm_eval", "reward_model_eval.json"))}
        models = {}

        def lm(which):
            if which not in models:
                models[which] = load_causal_lm(init_model if which == "init" else sft_model)
            return models[which]

        _check_same_tokenizer((lm("init")[1], lm("sft")[1]))
        needed = set(RM_KINDS[rm_kind])
        for which, stage in (("init", "samples-init"), ("sft", "samples-sft")):
            settings = {"model": os.path.abspath(init_model if which == "init" else sft_model), "n": samples_per_prompt,
                        **gen, **data_id}
            if which not in needed:
                continue
            if stages.done(stage, settings):
                log(f"stage {stage}: done already ({paths[which]})")
                continue
            model, tok = lm(which)
            sample(model, tok, demo_prompts, n=samples_per_prompt, batch_size=batch_size, source=which,
                   output=paths[which], cache_dir=os.path.join(output_dir, "cache"), show_progress=show_progress, **gen)
            stages.mark(stage, settings)
            log(f"stage {stage}: wrote {paths[which]}")

        rm_opts = {"output_dir": os.path.join(output_dir, "reward_model_training"), "rm_kind": rm_kind,
                   **(rm_options or {})}
        rm_settings = {"rm_kind": rm_kind, "rm_base": os.path.abspath(rm_base), "options": rm_opts, **gen, **data_id}
        if stages.done("reward-model", rm_settings):
            log(f"stage reward-model: done already ({paths['rm']})")
        else:
            from fastalign.trainers.afd_reward import AfDRewardTrainer
            cfg = AfDRewardConfig.from_dict(rm_opts)
            samples = {k: read_jsonl(paths[k]) for k in needed if k != "demo"}
            rows = reward_rows(rm_kind, demos=demo_rows, init_samples=samples.get("init"),
                               sft_samples=samples.get("sft"))
            train_rows, eval_rows = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
            rm, tok = load_reward_model(rm_base)
            trainer = AfDRewardTrainer(rm, tokenizer=tok, train_dataset=train_rows,
                                       eval_dataset=eval_rows or None, config=cfg)
            # an interrupted run of this stage resumes from its last checkpoint (save_steps in rm_options)
            trainer.train(resume_from_checkpoint=ckpt.latest_checkpoint(cfg.output_dir))
            trainer.save_model(paths["rm"])
            if eval_rows:
                metrics = trainer.evaluate()
                write_jsonl(paths["rm_eval"], [metrics])
                log("reward model held out: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            stages.mark("reward-model", rm_settings)
            log(f"stage reward-model: saved {paths['rm']}")

        bon_settings = {"n": n, "rm": rm_settings, "sft": os.path.abspath(sft_model), **gen, **data_id}
        if stages.done("best-of-n", bon_settings):
            log(f"stage best-of-n: done already ({paths['bon']})")
        else:
            model, tok = lm("sft")
            rm, _ = load_reward_model(paths["rm"], tok)
            result = best_of_n(model, rm.to(_device()), tok, bon_prompts, n=n, batch_size=batch_size,
                               cache_dir=os.path.join(output_dir, "cache"), output=paths["bon"],
                               show_progress=show_progress, **gen)
            stages.mark("best-of-n", bon_settings)
            log(f"stage best-of-n: wrote {paths['bon']} (mean chosen score {float(result.chosen_scores.mean()):.3f})")
        return paths
