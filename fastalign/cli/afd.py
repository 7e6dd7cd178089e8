"""`fastalign afd | sample | best-of-n | afd-rm`: alignment from demonstrations, whole or one step at a time."""
import argparse
import os

from fastalign.cli.common import _add_config_flags, load_config_file
from fastalign.cli.inputs import positive_int


def _output_flags(p, what):
    p.add_argument("--output", required=True, help=f"output .jsonl ({what}); written atomically. An existing file is "
                   "refused unless --overwrite is given")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _generation_flags(p, n_default=1):
    p.add_argument("--n", type=positive_int, default=n_default, help=f"samples per prompt (default {n_default})")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=positive_int, default=64,
                   help="tokens generated at most per sample (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same samples (default 0)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=16,
                   help="prompts generated at once (default 16)")


def _gen_kwargs(args):
    from fastalign.config import ConfigError
    for name in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                batch_size=args.batch_size)


def cmd_sample(args):
    from fastalign.afd import load_causal_lm, load_prompts
    from fastalign.generation import check_output_path, sample
    check_output_path(args.output, args.overwrite, "--output")  # before any sampling
    prompts = load_prompts(args.prompts)
    model, tok = load_causal_lm(args.model)
    rows = sample(model, tok, prompts, n=args.n, source=args.source or args.model, output=args.output,
                  cache_dir=args.cache_dir, **_gen_kwargs(args))
    print(f"{len(rows)} samples written to {args.output}")
    return 0


def cmd_best_of_n(args):
    from fastalign.afd import load_causal_lm, load_prompts, load_reward_model
    from fastalign.generation import check_output_path
    from fastalign.model_folders import require_local_folder
    from fastalign.scoring import _check_same_tokenizer, best_of_n, log_ratio_scorer
    if (args.reward_model is None) == (args.log_ratio is None):
        from fastalign.config import ConfigError
        raise ConfigError("give exactly one scorer: --reward-model DIR or --log-ratio MODEL_A MODEL_B")
    check_output_path(args.output, args.overwrite, "--output")  # before any sampling
    for what, path in [("--policy", args.policy), ("--reward-model", args.reward_model)] + \
            [("--log-ratio", m) for m in args.log_ratio or ()]:
        if path is not None:
            require_local_folder(path, what)
    prompts = load_prompts(args.prompts)
    policy, tok = load_causal_lm(args.policy)
    if args.reward_model:
        scorer, _ = load_reward_model(args.reward_model, tok)
        scorer = scorer.to(next(policy.parameters()).device)
    else:
        (a, tok_a), (b, tok_b) = load_causal_lm(args.log_ratio[0]), load_causal_lm(args.log_ratio[1])
        _check_same_tokenizer((tok, tok_a))
        scorer = log_ratio_scorer(a, b, (tok_a, tok_b), batch_size=args.score_batch_size)
    result = best_of_n(policy, scorer, tok, prompts, n=args.n, output=args.output, cache_dir=args.cache_dir,
                       score_batch_size=args.score_batch_size, **_gen_kwargs(args))
    print(f"Best-of-{args.n} for {len(prompts)} prompts written to {args.output} "
          f"(mean chosen score {float(result.chosen_scores.mean()):.4f})")
    return 0


def _afd_rm_rows(args, cfg):
    """(train, eval) rows of afd-rm: --data (and --eval-data) as given, or built from --rm-kind's parts."""
    from fastalign.afd import load_demos, load_samples, reward_rows, split_by_prompt
    from fastalign.config import ConfigError
    from fastalign.data import load_rows
    from fastalign.trainers.afd_reward import RM_KINDS
    parts = {"--demos": args.demos, "--init-samples": args.init_samples, "--sft-samples": args.sft_samples}
    given = [flag for flag, v in parts.items() if v]
    if args.data:
        clash = given + (["--rm-kind"] if "rm_kind" in vars(args) else [])
        if clash:
            raise ConfigError(f"--data (labelled rows) cannot be combined with {', '.join(clash)} (rows built by "
                              "--rm-kind): give either --data, or --rm-kind with its parts")
        return load_rows(args.data), load_rows(args.eval_data) if args.eval_data else None
    if args.eval_data:
        raise ConfigError("--eval-data goes with --data; with --rm-kind, --eval-fraction of the prompts is held out")
    flag_of = {"demo": "--demos", "init": "--init-samples", "sft": "--sft-samples"}
    pos, neg = (flag_of[p] for p in RM_KINDS[cfg.rm_kind])
    missing = [f for f in (pos, neg) if not parts[f]]
    if missing:
        raise ConfigError(f"--rm-kind {cfg.rm_kind} trains {pos} (positives) against {neg} (negatives): "
                          f"{' and '.join(missing)} missing (or give labelled rows with --data)")
    unused = [f for f in given if f not in (pos, neg)]
    if unused:
        raise ConfigError(f"--rm-kind {cfg.rm_kind} does not use {' or '.join(unused)} (it trains {pos} against "
                          f"{neg}): leave it out, or choose the --rm-kind that uses it")
    rows = reward_rows(cfg.rm_kind, demos=load_demos(args.demos) if args.demos else None,
                       init_samples=load_samples(args.init_samples, "init_samples") if args.init_samples else None,
                       sft_samples=load_samples(args.sft_samples, "sft_samples") if args.sft_samples else None)
    train_rows, eval_rows = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
    return train_rows, eval_rows or None


def cmd_afd_rm(args):
    from fastalign.afd import load_reward_model
    from fastalign.trainers.afd_reward import AfDRewardConfig, AfDRewardTrainer
    opts = load_config_file(args.config) if args.config else {}
    opts.update({k: v for k, v in vars(args).items() if k in AfDRewardConfig.__dataclass_fields__})
    if args.output_dir:
        opts["output_dir"] = args.output_dir
    cfg = AfDRewardConfig.from_dict(opts)
    train_rows, eval_rows = _afd_rm_rows(args, cfg)
    model, tok = load_reward_model(args.model, new_head=True)  # a causal LM starts with a fresh head
    trainer = AfDRewardTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=eval_rows, config=cfg)
    trainer.train()
    out = trainer.save_model()
    if trainer.is_main:
        print(f"\nreward model saved to {out}; metrics in {os.path.join(cfg.output_dir, 'metrics.jsonl')}")
        if eval_rows:
            print("\n| eval metric | value |\n|---|---:|")
            for k, v in trainer.evaluate().items():
                print(f"| {k} | {v:.4f} |")
    return 0


def cmd_afd(args):
    from fastalign.afd import run_afd
    rm_opts = load_config_file(args.rm_config) if args.rm_config else {}
    paths = run_afd(args.init_model, args.sft_model, args.demos, args.prompts, output_dir=args.output_dir,
                    rm_kind=args.rm_kind, n=args.n, rm_base=args.rm_model, samples_per_prompt=args.samples_per_prompt,
                    rm_options=rm_opts, **_gen_kwargs(args))
    print(f"\nBest-of-{args.n} answers in {paths['bon']}; reward model in {paths['rm']}")
    return 0


def register(sub):
    from fastalign.trainers.afd_reward import RM_KINDS, AfDRewardConfig
    kinds = ", ".join(RM_KINDS)

    p = sub.add_parser("afd", help="alignment from demonstrations: sample, train the discriminator reward model, "
                       "Best-of-N (resumable stages)",
                       description="Steps 2-4 of AfD (Sun and van der Schaar, 2024) after `fastalign train sft`: "
                       "samples from the initial and SFT models on the demonstrations' prompts, the BCE "
                       "discriminator reward model, Best-of-N from the SFT model on --prompts. A finished stage "
                       "(stages/<name>.done in --output-dir) is not redone.")
    p.add_argument("--init-model", dest="init_model", required=True, help="the initial model (save_pretrained folder)")
    p.add_argument("--sft-model", dest="sft_model", required=True, help="the model after SFT on --demos")
    p.add_argument("--demos", required=True, help="demonstrations .jsonl (prompt, completion)")
    p.add_argument("--prompts", help=".jsonl of {prompt} to answer with Best-of-N (default: the demos' prompts)")
    p.add_argument("--rm-kind", dest="rm_kind", default="init-sft", choices=list(RM_KINDS),
                   help=f"positives-negatives of the reward model: {kinds} (default init-sft)")
    p.add_argument("--rm-model", dest="rm_model", help="folder the reward model starts from (default --init-model)")
    p.add_argument("--rm-config", dest="rm_config", help="YAML of AfDRewardConfig options for the reward model")
    p.add_argument("--samples-per-prompt", dest="samples_per_prompt", type=positive_int, default=1,
                   help="samples per demonstration prompt for the reward model's rows (default 1)")
    p.add_argument("--output-dir", dest="output_dir", required=True,
                   help="folder of every stage's outputs (samples, reward model, Best-of-N); one run per folder")
    _generation_flags(p, n_default=16)
    p.set_defaults(func=cmd_afd)

    p = sub.add_parser("sample", help="sample completions from a model into JSONL (prompt, completion, source)")
    p.add_argument("--model", required=True, help="save_pretrained folder of a causal LM")
    p.add_argument("--prompts", required=True, help=".jsonl of {prompt}")
    _output_flags(p, "prompt, completion, source, sample_index, seed")
    p.add_argument("--source", help="the source field of each row (default: --model)")
    p.add_argument("--cache-dir", dest="cache_dir", help="reuse samples of an identical earlier call")
    _generation_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("best-of-n", help="Best-of-N under a reward model or the log-ratio score")
    p.add_argument("--policy", required=True, help="save_pretrained folder of the model to sample from")
    p.add_argument("--reward-model", dest="reward_model", help="sequence-classification reward model folder")
    p.add_argument("--log-ratio", dest="log_ratio", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                   help="score by log pi_A(y|x) - log pi_B(y|x) (e.g. the SFT and the initial model)")
    p.add_argument("--prompts", required=True, help=".jsonl of {prompt}")
    _output_flags(p, "chosen answer, its score, all candidates")
    p.add_argument("--score-batch-size", dest="score_batch_size", type=positive_int, default=64,
                   help="candidates scored at once (default 64)")
    p.add_argument("--cache-dir", dest="cache_dir", help="reuse samples of an identical earlier call")
    _generation_flags(p, n_default=16)
    p.set_defaults(func=cmd_best_of_n)

    p = sub.add_parser("afd-rm", help="train the AfD discriminator reward model (BCE on labelled answers)",
                       description="Either --data with labelled rows (prompt, answer, label 0/1), or --rm-kind with "
                       "the two parts it needs, from --demos, --init-samples, --sft-samples (JSONL from `fastalign "
                       "sample`); the two ways cannot be mixed. Every file is checked before training.")
    p.add_argument("--model", required=True, help="folder the reward model starts from (loaded as "
                   "AutoModelForSequenceClassification, num_labels=1)")
    p.add_argument("--config", help="YAML file of options (flags given here override it)")
    p.add_argument("--data", help="labelled rows .jsonl (prompt, answer, label)")
    p.add_argument("--eval-data", dest="eval_data", help="held-out labelled rows .jsonl (prompt, answer, label)")
    p.add_argument("--demos", help="demonstrations .jsonl (prompt, completion): the positives of --rm-kind")
    p.add_argument("--init-samples", dest="init_samples", help="samples of the initial model .jsonl (`fastalign sample`)")
    p.add_argument("--sft-samples", dest="sft_samples", help="samples of the SFT model .jsonl (`fastalign sample`)")
    p.add_argument("--output-dir", dest="output_dir", help="where the reward model is saved (or set output_dir in --config)")
    p.add_argument("--resume", dest="resume_from_checkpoint", nargs="?", const="latest", default=argparse.SUPPRESS,
                   metavar="CHECKPOINT", help="resume the run in --output-dir from its latest checkpoint, or from the "
                   "CHECKPOINT folder given (same as --resume-from-checkpoint)")
    _add_config_flags(p, AfDRewardConfig)
    p.set_defaults(func=cmd_afd_rm)
