"""Command line: `fastalign info`, `fastalign train dpo|rm|sft`."""
import argparse
import json
import os
import platform
import sys


def info_dict():
    import torch

    import fastalign
    from fastalign import _ext
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU-only machines
        triton_version = None
    try:
        import transformers
        transformers_version = transformers.__version__
    except Exception:
        transformers_version = None
    cuda = torch.cuda.is_available()
    return {
        "fastalign": fastalign.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "extension_built": _ext.C is not None,
        "extension_error": _ext.ERROR,
        "backends": fastalign.available_backends(),
    }


def cmd_info(args):
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(map(len, d))
    for k, v in d.items():
        if k == "extension_error" and v is None:
            continue
        print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    return 0


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
            parser.add_argument(flag, dest=f.name, type=_parse_bool, default=argparse.SUPPRESS, metavar="BOOL")
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


def cmd_train(args):
    from fastalign.config import CONFIGS
    from fastalign.data import DEFAULT_PREFERENCES, load_rows
    kind = args.kind
    opts = {}
    if args.config:
        opts.update(load_config_file(args.config))
    model_path = args.model or opts.pop("model", None)
    data = args.data or opts.pop("data", None)
    eval_data = args.eval_data or opts.pop("eval_data", None)
    flags = {k: v for k, v in vars(args).items() if k not in ("kind", "config", "model", "data", "eval_data", "func",
                                                               "command", "output_dir")}
    opts.update(flags)
    if args.output_dir:
        opts["output_dir"] = args.output_dir
    model, tok, embedded = load_model(kind, model_path)
    if embedded:
        opts = {**EMBEDDED_DEFAULTS[kind], **opts}
        opts.setdefault("output_dir", f"runs/{kind}-tiny")
    config = CONFIGS[kind].from_dict(opts)
    if data is None:
        train_rows, eval_rows = load_rows(DEFAULT_PREFERENCES, "train"), load_rows(DEFAULT_PREFERENCES, "test")
    else:
        train_rows = load_rows(data)
        eval_rows = load_rows(eval_data) if eval_data else None
    from fastalign import trainer as tr
    if kind == "dpo":
        t = tr.DPOTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    elif kind == "rm":
        t = tr.RewardTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    else:
        t = tr.SFTTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    t.train()
    out = t.save_model()
    if t.is_main:
        print(f"\nmodel saved to {out}; metrics in {os.path.join(config.output_dir, 'metrics.jsonl')}")
        if eval_rows is not None:
            metrics = t.evaluate()
            print("\n| eval metric | value |\n|---|---:|")
            for k, v in metrics.items():
                print(f"| {k} | {v:.4f} |")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="fastalign", description="Fast, lean preference optimization.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, backends available, device, whether the extension built")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=cmd_info)
    from fastalign.config import CONFIGS
    pt = sub.add_parser("train", help="train a Hugging Face model: dpo, rm (reward model) or sft")
    kinds = pt.add_subparsers(dest="kind", required=True)
    helps = {"dpo": "DPO family, SimPO, ORPO (--loss-type)", "rm": "Bradley-Terry reward model (weighted MLE with a "
             "weight column)", "sft": "supervised fine-tuning on demonstrations"}
    for kind, cls in CONFIGS.items():
        pk = kinds.add_parser(kind, help=helps[kind], description=f"{helps[kind]}. With no --model and --data, the "
                              "embedded tiny Llama and persona preference data are used.")
        pk.add_argument("--config", help="YAML file of options (flags given here override it)")
        pk.add_argument("--model", help="local folder written by save_pretrained (default: embedded tiny Llama)")
        pk.add_argument("--data", help=".json/.jsonl training data (default: embedded persona preferences)")
        pk.add_argument("--eval-data", dest="eval_data", help=".json/.jsonl evaluation data")
        pk.add_argument("--output-dir", dest="output_dir")
        _add_config_flags(pk, cls)
        pk.set_defaults(func=cmd_train)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fastalign.config import ConfigError
    from fastalign.data import DataError
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"fastalign: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
