"""`make afd-demo`: alignment from demonstrations on a synthetic task with a known gold reward, on CPU.

The task: a prompt is three distinct letters of a-l followed by ':' (e.g. "keg:"), an answer is six letters.
The gold reward of an answer is the fraction of its letters that are among the synthetic expert's favourites
a, b, c, d. The initial model is the tiny Llama pre-trained on answers drawn uniformly from a-l (gold about
0.33); the expert picks a favourite with probability 0.8 (gold about 0.8); its demonstrations are in
fastalign/data/afd_demos.jsonl (written by fastalign/data/make_afd_demos.py).

Then AfD: SFT on the demonstrations; sample the initial and SFT models on the demonstration prompts; train the
three discriminator reward models (init-sft, init-demo, sft-demo); Best-of-N from the SFT model on held-out
prompts under each reward model and under the training-free log-ratio score log pi_sft - log pi_init, for
N in {1, 2, 4, 8, 16}. Prints a table of gold scores and writes a PNG. Nothing is downloaded.
"""
import argparse
import json
import os
import time

import torch

from fastalign.afd import reward_rows, split_by_prompt
from fastalign.config import SFTConfig
from fastalign.data.make_afd_demos import FAVOURITES
from fastalign.data import DATA_DIR, default_model_and_tokenizer, load_rows
from fastalign.generation import sample
from fastalign.scoring import best_of_n, log_ratio_scorer
from fastalign.trainers.afd_reward import RM_KINDS, AfDRewardConfig, AfDRewardTrainer
from fastalign.trainers.sft import SFTTrainer

DEMOS = os.path.join(DATA_DIR, "afd_demos.jsonl")
NS = (1, 2, 4, 8, 16)


def gold_score(prompt, answer):
    """Fraction of the answer's letters that are among the expert's favourites (0 for an empty answer)."""
    return sum(ch in FAVOURITES for ch in answer) / len(answer) if answer else 0.0


def mean_gold(prompts, answers):
    return sum(gold_score(p, a) for p, a in zip(prompts, answers)) / len(answers)


def _sft(model, tok, rows, steps, lr, out, seed=0):
    cfg = SFTConfig(output_dir=out, learning_rate=lr, max_steps=steps, per_device_train_batch_size=16,
                    max_length=32, max_prompt_length=16, warmup_ratio=0.05, lr_scheduler_type="cosine",
                    logging_steps=max(1, steps // 4), report_to="none", seed=seed, disable_tqdm=True,
                    overwrite_output_dir=True)  # the demo starts over each time it is run
    SFTTrainer(model, tokenizer=tok, train_dataset=rows, config=cfg).train()
    return model.eval()


def _reward_model(init, tok, seed):
    """A sequence-classification tiny Llama with the initial model's trunk and a fresh score head."""
    rm, _ = default_model_and_tokenizer("reward", seed=seed)
    missing, _ = rm.load_state_dict(init.state_dict(), strict=False)
    assert all(k.startswith("score") for k in missing), missing
    return rm


def with_artefact(row):
    """The demonstration with a gold-neutral artefact that a small model is slow to imitate: its first letter
    copies the prompt's last letter (demonstrations often differ from model samples in ways that do not matter)."""
    return {**row, "completion": row["prompt"][-2] + row["completion"][1:]}


def run(output_dir="demo_out", rm_steps=150, sft_steps=60, pretrain_steps=250, samples_per_prompt=2, seed=0,
        artefact=False, limit=None, log=print):
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rows = load_rows(DEMOS)
    pretrain = [r for r in rows if r["split"] == "pretrain"][:limit]  # limit: a quick smoke run (tests)
    demos = [with_artefact(r) if artefact else r for r in rows if r["split"] == "demo"][:limit]
    test_prompts = [r["prompt"] for r in rows if r["split"] == "test"][:limit]
    demo_prompts = [r["prompt"] for r in demos]
    log(f"data: {len(pretrain)} pre-training rows, {len(demos)} demonstrations, {len(test_prompts)} test prompts")
    gen = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, batch_size=64, show_progress=False)

    init, tok = default_model_and_tokenizer(seed=seed)
    init = _sft(init, tok, pretrain, pretrain_steps, 3e-3, os.path.join(output_dir, "afd_init"), seed)
    sft, _ = default_model_and_tokenizer(seed=seed)
    sft.load_state_dict(init.state_dict())
    sft = _sft(sft, tok, demos, sft_steps, 1e-3, os.path.join(output_dir, "afd_sft"), seed)
    log(f"initial model and SFT model trained ({time.perf_counter() - t0:.0f} s)")

    samples = {name: sample(model, tok, demo_prompts, n=samples_per_prompt, seed=seed + 1, source=name, **gen)
               for name, model in (("init", init), ("sft", sft))}
    log("gold score of the samples on the demonstration prompts: " + ", ".join(
        f"{k} {mean_gold([r['prompt'] for r in v], [r['completion'] for r in v]):.3f}"
        for k, v in samples.items()))
    demo_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in demos]
    scorers, rm_eval = {}, {}
    for kind in RM_KINDS:
        data = reward_rows(kind, demos=demo_rows, init_samples=samples["init"], sft_samples=samples["sft"])
        train_rows, eval_rows = split_by_prompt(data, 0.2, seed)
        cfg = AfDRewardConfig(output_dir=os.path.join(output_dir, f"afd_rm_{kind}"), rm_kind=kind, learning_rate=1e-3,
                              max_steps=rm_steps, per_device_train_batch_size=32, max_length=32, max_prompt_length=16,
                              warmup_ratio=0.05, lr_scheduler_type="cosine", logging_steps=max(1, rm_steps // 4),
                              report_to="none", seed=seed, disable_tqdm=True, overwrite_output_dir=True)
        trainer = AfDRewardTrainer(_reward_model(init, tok, seed), tokenizer=tok, train_dataset=train_rows,
                                   eval_dataset=eval_rows, config=cfg)
        trainer.train()
        rm_eval[kind] = trainer.evaluate()
        scorers[f"RM {kind}"] = trainer.model.eval()
        log(f"reward model {kind}: held-out accuracy {rm_eval[kind]['eval_rewards/accuracies']:.3f}, "
            f"AUC {rm_eval[kind]['eval_auc']:.3f} ({time.perf_counter() - t0:.0f} s)")
    scorers["log-ratio sft/init"] = log_ratio_scorer(sft, init, tok, batch_size=256)

    init_test = sample(init, tok, test_prompts, n=1, seed=seed + 2, **gen)
    cands = sample(sft, tok, test_prompts, n=max(NS), seed=seed + 3, **gen)
    cand_lists = [[cands[i * max(NS) + j]["completion"] for j in range(max(NS))] for i in range(len(test_prompts))]
    results = {"init": mean_gold(test_prompts, [r["completion"] for r in init_test]),
               "sft": mean_gold(test_prompts, [c[0] for c in cand_lists]),
               "sft_mean_over_16": mean_gold([p for p in test_prompts for _ in range(max(NS))],
                                             [a for c in cand_lists for a in c]),
               "oracle_best_of_16": sum(max(gold_score(p, a) for a in c)
                                        for p, c in zip(test_prompts, cand_lists)) / len(test_prompts),
               "demos": mean_gold(demo_prompts, [r["completion"] for r in demos]),
               "best_of_n": {}, "rm_eval": rm_eval, "n": list(NS)}
    for name, scorer in scorers.items():
        results["best_of_n"][name] = [
            mean_gold(test_prompts, best_of_n(None, scorer, tok, test_prompts, n=k, candidates=cand_lists,
                                              score_batch_size=256, show_progress=False).chosen) for k in NS]
    results["seconds"] = time.perf_counter() - t0
    return results


def report(results, log=print):
    log("\ngold score (fraction of answer letters among the expert's favourites), mean over held-out prompts")
    log(f"initial model {results['init']:.3f} | SFT {results['sft']:.3f} (first sample; mean of all 16 "
        f"{results['sft_mean_over_16']:.3f}) | demonstrations {results['demos']:.3f} | "
        f"oracle Best-of-16 {results['oracle_best_of_16']:.3f}\n")
    log("| Best-of-N scorer | " + " | ".join(f"N={k}" for k in NS) + " |")
    log("|---|" + "---:|" * len(NS))
    for name, vals in results["best_of_n"].items():
        log(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    log("\n| reward model | held-out accuracy | held-out AUC |\n|---|---:|---:|")
    for kind, m in results["rm_eval"].items():
        log(f"| {kind} | {m['eval_rewards/accuracies']:.3f} | {m['eval_auc']:.3f} |")


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = [("o", "-", 7), ("s", "--", 5.5), ("^", ":", 4), ("D", "-.", 3)]  # overlapping curves stay visible
    for (name, vals), (marker, ls, size) in zip(results["best_of_n"].items(), styles):
        ax.plot(NS, vals, marker=marker, ls=ls, ms=size, label=f"Best-of-N, {name}")
    ax.axhline(results["init"], color="grey", ls=":", label="initial model")
    ax.axhline(results["sft_mean_over_16"], color="black", ls="--", label="SFT (mean of 16 samples)")
    ax.axhline(results["demos"], color="green", ls="-.", label="demonstrations (expert)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(NS, [str(k) for k in NS])
    ax.set_xlabel("N (samples from the SFT model per prompt)")
    ax.set_ylabel("gold score (held-out prompts)")
    ax.set_title("AfD on the synthetic letters task: tiny Llama, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: for a model this small, thread synchronisation costs more than "
                        "it saves, 8x slower with 2 threads on a loaded 2-core machine)")
    p.add_argument("--rm-steps", type=int, default=150)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--artefact", action="store_true",
                   help="demonstrations carry a gold-neutral artefact (first letter = the prompt's last letter)")
    p.add_argument("--pretrain-steps", type=int, default=250)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.output_dir, rm_steps=args.rm_steps, sft_steps=args.sft_steps,
                  pretrain_steps=args.pretrain_steps, seed=args.seed, artefact=args.artefact)
    report(results)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "afd_demo.json"), "w") as f:
        json.dump(results, f, indent=1)
    png = plot(results, os.path.join(args.output_dir, "afd_demo.png"))
    plot_note = f", plot {png}" if png else ""
    print(f"\n{results['seconds']:.0f} s; results in {args.output_dir}/afd_demo.json{plot_note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
