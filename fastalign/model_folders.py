"""Loading a local ``save_pretrained`` folder as the kind of model a command expects, or a clear error.

transformers loads a sequence-classification checkpoint as a causal LM (and the reverse) without complaint: the
head the folder lacks is initialized at random and every score computed with it is noise. ``load_model_folder``
refuses that: the folder must exist (fastalign never downloads), its config's architectures must not name the
other kind, and no weight may be left out of the checkpoint (transformers' loading info).
"""
import os

from fastalign.errors import FastalignError

KINDS = {
    "causal-lm": ("a causal language model (e.g. LlamaForCausalLM: a save_pretrained folder of the policy)",
                  "AutoModelForCausalLM"),
    "reward-model": ("a reward model (a sequence-classification model with one label, e.g. "
                     "LlamaForSequenceClassification)", "AutoModelForSequenceClassification"),
}


class ModelFolderError(FastalignError):
    """A model folder that does not hold the kind of model expected (or loads only with weights at random)."""


def _is_classifier(arch):
    return arch.endswith("ForSequenceClassification")


def _is_causal_lm(arch):
    return arch.endswith(("ForCausalLM", "LMHeadModel"))


def require_local_folder(path, option):
    """``path`` unless it is not a local folder with a config.json: FileNotFoundError (missing, or no config.json)
    or NotADirectoryError (a file), each naming ``option`` ('--post', 'reward model')."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path!r} does not exist: no such local folder (expected a folder written "
                                "by save_pretrained; fastalign never downloads)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{option} {path!r} is a file; expected a folder written by save_pretrained")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{option} {path!r} holds no config.json: expected a folder written by "
                                "save_pretrained")
    return path


def load_model_folder(path, option, kind, tokenizer=None, **kwargs):
    """The model in ``path`` loaded as ``kind`` ("causal-lm" or "reward-model", one label), in eval mode.

    Raises FileNotFoundError for a missing folder and ModelFolderError, naming the folder, what it holds and
    what was expected, when its config's architectures are the other kind or when any weight of the model is
    missing from (or has another shape in) the checkpoint. A reward model gets ``config.pad_token_id`` (from
    ``tokenizer``'s pad or eos token) when it has none, so batches of several sequences score their last token.
    """
    import transformers
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    expected, auto = KINDS[kind]
    require_local_folder(path, option)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    holds = f"a {', '.join(archs)}" if archs else f"a {config.model_type} model"
    wrong = _is_classifier if kind == "causal-lm" else _is_causal_lm
    if archs and all(wrong(a) for a in archs):
        raise ModelFolderError(f"{option} {path!r} holds {holds} (config.json architectures), but {expected} "
                               "was expected")
    if kind == "reward-model":
        kwargs.setdefault("num_labels", 1)
    model, info = getattr(transformers, auto).from_pretrained(path, local_files_only=True, output_loading_info=True,
                                                              **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = missing or mismatched
        why = "are missing from it" if missing else "have another shape in it"
        raise ModelFolderError(f"{option} {path!r} holds {holds}, but {expected} was expected: "
                               f"{len(bad)} weight(s) of that model {why} and would be initialized at random "
                               f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")
    if kind == "reward-model" and model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    return model.eval()
