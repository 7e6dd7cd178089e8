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


# Choices for fields whose metadata does not list them (the config module's own constants: one source).
def _fallback_choices(name):
    from fastalign import config
    return {"lr_scheduler_type": getattr(config, "SCHEDULERS", None), "report_to": getattr(config, "REPORT_TO", None),
            "loss_type": getattr(config, "PREFERENCE_LOSS_TYPES", None),
            "backend": ("auto", "triton", "cpp", "torch")}.get(name)


def _field_default(f):
    import dataclasses
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()
    return None


def _show(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "[]"
    return str(value)


def flag_help(f, kind_defaults=None):
    """A flag's help: the field's metadata help (or its name), its choices, its default (and the embedded
    tiny model's default where that differs)."""
    text = f.metadata.get("help") or f.name.replace("_", " ")
    choices = f.metadata.get("choices") or _fallback_choices(f.name)
    parts = [text.rstrip(".")]
    if choices:
        parts.append(f"choices: {', '.join(map(str, choices))}")
    default = _field_default(f)
    tail = f"default: {_show(default)}"
    if kind_defaults and f.name in kind_defaults and kind_defaults[f.name] != default:
        tail += f"; with the embedded tiny model: {_show(kind_defaults[f.name])}"
    parts.append(tail)
    return "; ".join(parts[:-1]) + f" ({parts[-1]})" if len(parts) > 1 else parts[0]


def _add_config_flags(parser, cls, kind_defaults=None):
    """One --flag per config field (dashes for underscores); only flags given on the command line are set.
    Help, choices and defaults come from the dataclass (field metadata "help" and "choices")."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if flag in ("--output-dir",):
            continue
        t = hints.get(f.name, f.type)
        args = typing.get_args(t)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), t)
        choices = f.metadata.get("choices") or _fallback_choices(f.name)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=flag_help(f, kind_defaults))
        if base is bool:
            # `--bf16` alone means true, as with transformers' HfArgumentParser
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="{true,false}", **kw)
        elif typing.get_origin(base) in (list, typing.Union) or f.name == "report_to":
            parser.add_argument(flag, nargs="+", metavar="VALUE", choices=choices, **kw)
        elif base in (int, float, str):
            kind = _parse_optional(base) if optional else base
            if choices and base is str:
                parser.add_argument(flag, type=kind, choices=list(choices) + ([None] if optional else []),
                                    metavar="{" + ",".join(map(str, choices)) + "}", **kw)
            else:
                parser.add_argument(flag, type=kind, metavar=base.__name__.upper(), **kw)


def add_model_loading_flags(parser):
    """--torch-dtype and --attn-implementation: how the --model folder is loaded (transformers' names)."""
    parser.add_argument("--torch-dtype", dest="torch_dtype", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype to load the model weights in; auto keeps the checkpoint's (default: auto)")
    parser.add_argument("--attn-implementation", dest="attn_implementation", default=None,
                        choices=("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"),
                        help="attention kernel to load the model with (default: transformers' choice, "
                             "usually sdpa)")


def load_config_file(path):
    import yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return data


def _dtype(name):
    import torch
    return None if name in (None, "auto") else getattr(torch, name)


def load_model(kind, model_path, torch_dtype="auto", attn_implementation=None):
    """(model, tokenizer, embedded?) from a local save_pretrained folder, or the embedded tiny model."""
    from fastalign.data import default_model_and_tokenizer
    if model_path in (None, "", "tiny"):
        model, tok = default_model_and_tokenizer("reward" if kind == "rm" else "causal-lm")
        if _dtype(torch_dtype) is not None:
            model = model.to(_dtype(torch_dtype))
        if attn_implementation:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(attn_implementation)
            else:
                model.config._attn_implementation = attn_implementation
        return model, tok, True
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"--model {model_path!r} is not a local directory: fastalign never downloads; "
                                "pass a folder written by save_pretrained, or omit --model for the embedded tiny model")
    import transformers
    major = int(transformers.__version__.split(".")[0])
    kw = {"local_files_only": True}
    if torch_dtype not in (None,):
        # transformers 5 names it dtype; 4.x torch_dtype ("auto" = the checkpoint's own dtype)
        kw["dtype" if major >= 5 else "torch_dtype"] = torch_dtype if torch_dtype == "auto" else _dtype(torch_dtype)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    tok = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if kind == "rm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **kw)
    return model, tok, False
