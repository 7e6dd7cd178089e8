"""`fastalign train dpo|rm|sft`."""
import argparse
import math
import os

from fastalign.cli.common import (EMBEDDED_DEFAULTS, _add_config_flags, add_model_loading_flags, load_config_file,
                                  load_model)

# argparse destinations that are not config fields
_NOT_CONFIG = ("kind", "config", "model", "data", "eval_data", "func", "command", "output_dir", "debug",
               "torch_dtype", "attn_implementation")


def _total_steps(trainer):
    cfg = trainer.config
    if getattr(trainer, "total_steps", None):
        return trainer.total_steps
    if cfg.max_steps > 0:
        return cfg.max_steps
    global_batches = len(trainer._epoch_order(0, trainer.train_examples, cfg.per_device_train_batch_size))
    return math.ceil(cfg.num_train_epochs * (global_batches // cfg.gradient_accumulation_steps))


def banner(trainer, train_rows, eval_rows):
    """The lines printed before training: what runs, on what, for how long, and where it is written."""
    import torch

    from fastalign.backends import resolve_backend
    from fastalign.integrations.hf import _unwrap
    cfg = trainer.config
    inner = _unwrap(trainer.model)
    n_params = sum(p.numel() for p in inner.parameters())
    n_train = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    dtype = next(inner.parameters()).dtype
    compute = f"{str(dtype).replace('torch.', '')}" + (" (bf16 autocast)" if cfg.bf16 else "")
    try:
        backend = resolve_backend(cfg.backend, trainer.device, torch.bfloat16 if cfg.bf16 else dtype)
    except (RuntimeError, ValueError, TypeError) as exc:
        backend = f"{cfg.backend} ({exc})"
    if trainer.data_kind == "reward":
        backend = "none (reward model: score head, no fused log-probs)"
    effective = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * trainer.world_size
    check = getattr(trainer, "model_check", None)
    unit = "rows" if trainer.data_kind == "sft" else "pairs"
    rows = [
        ("model", f"{type(inner).__name__}, {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable)"),
        ("data", f"{len(trainer.train_examples)} train rows (of {len(train_rows)} given)"
                 + (f", {len(trainer.eval_examples)} eval rows" if trainer.eval_examples is not None else
                    ", no eval split")),
        ("backend", f"{backend} on {trainer.device}, {compute}"),
        ("batch", f"{effective} {unit} per step = {cfg.per_device_train_batch_size} per device x "
                  f"{cfg.gradient_accumulation_steps} accumulation x {trainer.world_size} process(es)"),
        ("steps", str(_total_steps(trainer))),
        ("output", os.path.abspath(cfg.output_dir)),
    ]
    if check is not None:
        rows.append(("model check", f"fused log-probs match the model's own (max |diff| {check.max_abs_diff:.1e})"))
    if getattr(cfg, "clone_robust", False):
        rows.append(("weighting", f"clone-robust pair weights (encoder {cfg.clone_robust_encoder or 'model'}, groups "
                                  f"by {cfg.clone_robust_group_by})"))
    if cfg.resume_from_checkpoint:
        from fastalign import checkpoint as ckpt
        where = cfg.resume_from_checkpoint
        if where in ("latest", True):
            where = ckpt.latest_checkpoint(cfg.output_dir) or "latest (none yet: the run will refuse to start)"
        rows.append(("resume", f"from {where}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}}: {v}" for k, v in rows)


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
    torch_dtype = opts.pop("torch_dtype", None) if args.torch_dtype == "auto" else args.torch_dtype
    attn = args.attn_implementation or opts.pop("attn_implementation", None)
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    opts.update(flags)
    if args.output_dir:
        opts["output_dir"] = args.output_dir
    if model_path in (None, "", "tiny"):  # the embedded tiny model: its own defaults under the user's options
        opts = {**EMBEDDED_DEFAULTS[kind], **opts}
        opts.setdefault("output_dir", f"runs/{kind}-tiny")
    config = CONFIGS[kind].from_dict(opts)  # bad options fail here, before any model is loaded
    # the embedded data's test split is the evaluation set only when neither file is given
    train_rows = load_rows(data) if data is not None else load_rows(DEFAULT_PREFERENCES, "train")
    if eval_data:
        eval_rows = load_rows(eval_data)
    else:
        eval_rows = load_rows(DEFAULT_PREFERENCES, "test") if data is None else None
    model, tok, _ = load_model(kind, model_path, torch_dtype=torch_dtype or "auto", attn_implementation=attn)
    from fastalign import trainers as tr
    if kind == "dpo":
        t = tr.DPOTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    elif kind == "rm":
        t = tr.RewardTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    else:
        t = tr.SFTTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    if t.is_main:
        print(f"fastalign train {kind}\n{banner(t, train_rows, eval_rows)}", flush=True)
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
    pt = sub.add_parser("train", help="train a Hugging Face model: dpo, rm (reward model) or sft",
                        description="Train a Hugging Face model with fastalign's fused losses.")
    kinds = pt.add_subparsers(dest="kind", required=True, metavar="kind")
    helps = {"dpo": "DPO family, SimPO, ORPO (--loss-type)", "rm": "Bradley-Terry reward model (weighted MLE with a "
             "weight column)", "sft": "supervised fine-tuning on demonstrations"}
    for kind, cls in CONFIGS.items():
        pk = kinds.add_parser(kind, help=helps[kind], description=f"{helps[kind]}. With no --model and --data, the "
                              "embedded tiny Llama and persona preference data are used. Every option can also "
                              "be set in the --config YAML file (flags given here override it).")
        pk.add_argument("--config", help="YAML file of options (flags given here override it)")
        pk.add_argument("--model", help="local folder written by save_pretrained (default: embedded tiny Llama)")
        pk.add_argument("--data", help=".jsonl, .json, .csv or .parquet training data (default: embedded persona "
                        "preferences)")
        pk.add_argument("--eval-data", dest="eval_data", help=".jsonl, .json, .csv or .parquet evaluation data (default: "
                        "the embedded data's test split when --data is not given either, else none)")
        out = cls.__dataclass_fields__["output_dir"]
        pk.add_argument("--output-dir", dest="output_dir", help=f"{out.metadata.get('help') or 'output dir: where '}"
                        f"{'' if out.metadata.get('help') else 'checkpoints, metrics and the final model go'} "
                        f"(default: {out.default}; runs/{kind}-tiny with the embedded tiny model)")
        pk.add_argument("--resume", dest="resume_from_checkpoint", nargs="?", const="latest", default=argparse.SUPPRESS,
                        metavar="CHECKPOINT", help="resume the run in --output-dir from its latest checkpoint, or "
                        "from the CHECKPOINT folder given (same as --resume-from-checkpoint)")
        add_model_loading_flags(pk)
        _add_config_flags(pk, cls, EMBEDDED_DEFAULTS.get(kind))
        pk.set_defaults(func=cmd_train)
