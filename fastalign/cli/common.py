"""Helpers every sub-command shares: config flags generated from the dataclasses, config files, model loading."""
import argparse
import os


# Settings for the embedded tiny model and data, applied under whatever the user sets: the library defaults
# (TRL's, for pretrained models) would barely move a freshly initialized tiny model.
EMBEDDED_DEFAULTS = {
    "dpo": dict(learning_rate=1e-3, beta=0.5, max_steps=300, per_device_train_batch_size=8, max_length=96,
                max_prompt_length=64, warmup_ratio=0.05, lr_scheduler_type="cosine", logging_steps=25, eval_steps=50),
    "rm": dict(learning_rate=1e-3, max_steps=300, per_device_train_batch_size=8, max_length=96, max_prompt_length=64,
               warmup_ratio=0.05, lr_scheduler_type="cosine", logging_steps=25, eval_steps=50),
    "sft": dict(learning_rate=2e-3, max_steps=200, per_device_train_batch_size=8, max_length=96, max_prompt_length=64,
                warmup_ratio=0.05, lr_scheduler_type="cosine", logging_steps=25, eval_steps=50),
}


def _parse_bool(text):
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional(kind):
    def parse(text):
        return None if str(text).lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_config_flags(parser, cls):
    """One --flag per config field (dashes for underscores); only flags given on the command line are set."""
    import dataclasses
    import typing
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if flag in ("--output-dir",):
            continue
        t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307
        args = typing.get_args(t)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), t)
        if base is bool:
            parser.add_argument(flag, dest=f.name, type=_parse_bool, default=argparse.SUPPRESS, metavar="BOOL",
                                nargs="?", const=True)  # a bare --flag means true
        elif f.name == "report_to":
            parser.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS)
        elif base in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=_parse_optional(base) if optional else base,
                                default=argparse.SUPPRESS)


def load_config_file(path):
    import yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return data


def load_model(kind, model_path):
    """(model, tokenizer, embedded?) from a local save_pretrained folder, or the embedded tiny model."""
    from fastalign.data import default_model_and_tokenizer
    if model_path in (None, "", "tiny"):
        model, tok = default_model_and_tokenizer("reward" if kind == "rm" else "causal-lm")
        return model, tok, True
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"--model {model_path!r} is not a local directory: fastalign never downloads; "
                                "pass a folder written by save_pretrained, or omit --model for the embedded tiny model")
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if kind == "rm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                                local_files_only=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    return model, tok, False
