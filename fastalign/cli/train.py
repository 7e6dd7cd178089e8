"""`fastalign train dpo|rm|sft`."""
import argparse

from fastalign.cli.common import EMBEDDED_DEFAULTS, _add_config_flags, load_config_file, load_model


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
    from fastalign import trainers as tr
    if kind == "dpo":
        t = tr.DPOTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    elif kind == "rm":
        t = tr.RewardTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    else:
        t = tr.SFTTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    t.train()
    out = t.save_model()
    # every process evaluates (FSDP's forward is a collective); the main process writes and prints
    metrics = t.evaluate() if eval_rows is not None else None
    if t.is_main:
        print(f"\nmodel saved to {out}; metrics in {t.metrics_path}")
        if metrics is not None:
            print("\n| eval metric | value |\n|---|---:|")
            for k, v in metrics.items():
                print(f"| {k} | {v:.4f} |")
    if t.distributed:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def register(sub):
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
        pk.add_argument("--resume", dest="resume_from_checkpoint", nargs="?", const="latest", default=argparse.SUPPRESS,
                        metavar="CHECKPOINT", help="resume the run in --output-dir from its latest checkpoint, or "
                        "from the CHECKPOINT folder given (same as --resume-from-checkpoint)")
        _add_config_flags(pk, cls)
        pk.set_defaults(func=cmd_train)
