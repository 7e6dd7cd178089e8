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
from fastalign.data import DataError, Rows, is_nonempty, load_rows, locations
from fastalign.data.errors import Problems, type_name
from fastalign.generation import sample, write_jsonl
from fastalign.model_folders import require_local_folder
from fastalign.scoring import _check_same_tokenizer, best_of_n
from fastalign.trainers.afd_reward import RM_KINDS, AfDRewardConfig
from fastalign.trainers.runlog import OutputDirLock

STAGES = ("samples-init", "samples-sft", "reward-model", "best-of-n")
ANSWER_KEYS = ("completion", "answer", "chosen")


def _load(data, role):
    """load_rows with the role said once (the loader's own messages already name the file and line)."""
    if isinstance(data, (str, os.PathLike)) and not os.path.exists(data):
        raise FileNotFoundError(f"{role}: file {os.fspath(data)!r} does not exist")
    try:
        return load_rows(data)
    except DataError as exc:
        raise DataError(f"{role}: {exc}") from None


def _check_prompt(value, where, problems, field="prompt"):
    """A prompt is non-blank text or a list of {role, content} messages with some content."""
    if is_nonempty(value):
        return True
    if isinstance(value, str):
        problems.add(where, "must be non-empty text, got an empty string", field)
    elif isinstance(value, list):
        found = "an empty list" if not value else "a list that is not {role, content} messages with text"
        problems.add(where, f"must be text or a list of {{role, content}} messages, got {found}", field)
    else:
        problems.add(where, f"must be text, got {type_name(value)}", field)
    return False


def check_answer_rows(rows, role, *, nonempty=True):
    """``Rows`` of {prompt, completion} from rows with a prompt and a completion (or answer, or chosen), each row
    keeping where it came from; DataError naming file:line (or row), field, found and expected for every bad row.
    nonempty: an empty completion is refused (demonstrations; a model's sample may be empty)."""
    problems = Problems(role)
    out, where_out = [], []
    for row, where in zip(rows, locations(rows)):
        if not isinstance(row, dict):
            problems.add(where, f"expected a {{prompt, completion}} object, got {type_name(row)}")
            continue
        key = next((k for k in ANSWER_KEYS if k in row), None)
        if "prompt" not in row or key is None:
            have = ", ".join(repr(k) for k in row) or "none"
            problems.add(where, f"missing (a row needs 'prompt' and 'completion' (or 'answer', or 'chosen'); "
                                f"the row has {have})", "prompt" if "prompt" not in row else "completion")
            continue
        ok = _check_prompt(row["prompt"], where, problems)
        answer = row[key]
        if not isinstance(answer, str):
            problems.add(where, f"must be text, got {type_name(answer)}", key)
            ok = False
        elif nonempty and not answer.strip():
            problems.add(where, "must be non-empty text, got an empty string", key)
            ok = False
        if ok:
            out.append({"prompt": row["prompt"], "completion": answer})
            where_out.append(where)
    problems.raise_if_any("malformed row(s)")
    return Rows(out, where_out, getattr(rows, "source", None))


def load_demos(data):
    """Demonstrations: rows with a non-empty prompt and a non-empty text completion (or answer, or chosen),
    all checked before any work. Returns ``Rows`` of {prompt, completion} that remember each row's file:line."""
    return check_answer_rows(_load(data, "demonstrations"), "demonstrations")


def load_samples(data, role="samples"):
    """Samples (`fastalign sample` output): rows with a prompt and a text completion (possibly empty)."""
    return check_answer_rows(_load(data, role), role, nonempty=False)


def load_prompts(data):
    """Prompts: a .jsonl/.json of rows with a prompt field, or a list of prompts / rows. Duplicates kept."""
    if isinstance(data, (list, tuple)) and data and not isinstance(data[0], dict):
        data = [{"prompt": p} for p in data]
    rows = _load(data, "prompts")
    problems = Problems("prompts")
    for row, where in zip(rows, locations(rows)):
        if "prompt" not in row:
            have = ", ".join(repr(k) for k in row) or "none"
            problems.add(where, f"missing (each row needs a 'prompt'; the row has {have})", "prompt")
        else:
            _check_prompt(row["prompt"], where, problems)
    problems.raise_if_any("malformed row(s)")
    return [r["prompt"] for r in rows]


def reward_rows(rm_kind, *, demos=None, init_samples=None, sft_samples=None):
    """(prompt, answer, label) rows for AfDRewardTrainer: positives (label 1) and negatives (label 0) by kind:
    init-sft = SFT samples vs initial-model samples; init-demo = demonstrations vs initial-model samples;
    sft-demo = demonstrations vs SFT samples. Inputs are rows with prompt and completion (checked: DataError
    names the bad row's file:line). Returns ``Rows``: each row remembers where it came from."""
    if rm_kind not in RM_KINDS:
        raise ConfigError(f"unknown rm_kind {rm_kind!r}; valid: {', '.join(RM_KINDS)}")
    given = {"demo": demos, "init": init_samples, "sft": sft_samples}
    names = {"demo": "demos", "init": "init_samples", "sft": "sft_samples"}
    out, where = [], []
    for label, part in zip((1, 0), RM_KINDS[rm_kind]):
        rows = given[part]
        if rows is None or len(rows) == 0:
            raise ValueError(f"rm_kind={rm_kind!r} needs {names[part]} ({'positives' if label else 'negatives'})")
        rows = check_answer_rows(rows, names[part], nonempty=part == "demo")
        out += [{"prompt": r["prompt"], "answer": r["completion"], "label": label, "source": part} for r in rows]
        where += locations(rows)
    return Rows(out, where)


def split_by_prompt(rows, eval_fraction, seed=0):
    """(train, eval) with every prompt's rows on one side (no prompt leaks into the held-out set); both ``Rows``
    keeping each row's origin."""
    keys = sorted({json.dumps(r["prompt"], sort_keys=True) for r in rows})
    random.Random(seed).shuffle(keys)
    held = set(keys[:int(round(eval_fraction * len(keys)))])
    where = locations(rows)
    side = [json.dumps(r["prompt"], sort_keys=True) in held for r in rows]
    return tuple(Rows([r for r, s in zip(rows, side) if s == h], [w for w, s in zip(where, side) if s == h])
                 for h in (False, True))


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
    require_local_folder(path, "model")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.to(_device()), tok


def load_reward_model(path, tokenizer=None, *, new_head=False):
    """A sequence-classification model (num_labels=1) from a save_pretrained folder. A folder without the
    reward head (e.g. a causal LM) is refused: its scores would come from a randomly initialised head.
    new_head=True (the start of reward-model training): such a folder is fine, its head is initialised fresh."""
    import transformers
    require_local_folder(path, "reward model")
    tok = tokenizer or transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, local_files_only=True, output_loading_info=True)
    prefix = f"{getattr(model, 'base_model_prefix', 'model')}."
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if not k.startswith(prefix)]
    trunk = [k for k in missing if k.startswith(prefix)]
    if trunk or (head and not new_head):
        with open(os.path.join(path, "config.json")) as f:
            archs = json.load(f).get("architectures") or ["a model of unknown architecture"]
        gap = f"the reward head ({', '.join(head)})" if head and not trunk else f"{len(missing)} weights " \
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        raise ValueError(f"reward model {path!r} holds a {', '.join(archs)} without {gap}: its scores would come "
                         f"from randomly initialised weights; expected a sequence-classification reward model "
                         f"(num_labels=1), e.g. the final/ folder of `fastalign afd-rm` or `fastalign train rm`")
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
            samples = {k: load_samples(paths[k], f"{k}_samples") for k in needed if k != "demo"}
            rows = reward_rows(rm_kind, demos=demo_rows, init_samples=samples.get("init"),
                               sft_samples=samples.get("sft"))
            train_rows, eval_rows = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
            rm, tok = load_reward_model(rm_base, new_head=True)
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
