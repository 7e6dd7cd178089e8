"""One end-to-end DPO training step, side by side: fastalign's DPOTrainer vs TRL's DPOTrainer, without and with
TRL's `use_liger_kernel=True` (TRL optional: `pip install 'fastalign[bench]'`; missing, it is a row saying so).

Same model (a Llama built from fastalign's embedded tiny config, optionally widened with --hidden/--layers/--vocab;
no download), same reference (a frozen copy), same data (the first --batch pairs of the embedded preference
data), same batch, same max_length, fp32 on CPU and bf16 autocast on CUDA. Every optimizer step sees the same
pairs (the batch is the whole training set), so steps are comparable; the step time is the median over the steps
after the first (which holds warm-up and compilation), timed between consecutive on_step_end callbacks. tokens/s
= tokens of one batch (prompt + answer of chosen and rejected, as fastalign tokenizes them: the same count for
every row) / median step time. Peak memory is the peak above the level before train() (CUDA allocator peak; CPU
resident set, sampled). Ratios are against TRL's DPOTrainer measured in the same run.

  python bench/bench_e2e_dpo.py                         # CPU: the tiny model, 4 pairs, 8 steps
  python bench/bench_e2e_dpo.py --vocab 32000 --hidden 256 --steps 6 --jsonl rows.jsonl
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import peers  # noqa: E402
from bench.common import JsonlStream, add_common_args, dryrun, environment, markdown_table, publish  # noqa: E402
from fastalign.profiling import PeakMemory  # noqa: E402

DEFAULTS = {"cpu": dict(batch=4, max_length=128, steps=8, hidden=None, layers=None, vocab=None),
            "cuda": dict(batch=16, max_length=512, steps=12, hidden=1024, layers=4, vocab=128256),
            "dryrun": dict(batch=2, max_length=64, steps=3, hidden=None, layers=None, vocab=None)}
LEARNING_RATE, BETA, SEED = 1e-5, 0.1, 0


def build_model(hidden, layers, vocab):
    """A fresh Llama from the embedded tiny config (widened when asked), the byte tokenizer, and a frozen copy
    as the reference; the same seed gives every trainer the same weights."""
    import transformers

    from fastalign.data import byte_tokenizer, tiny_llama_config
    tok = byte_tokenizer()
    over = {}
    if hidden:  # heads of 64 dimensions (at least 4), a quarter as many kv heads, MLP 3x wide
        heads = max(4, hidden // 64)
        over.update(hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 4))
    if layers:
        over["num_hidden_layers"] = layers
    cfg = tiny_llama_config(max(vocab or 0, len(tok)), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **over)
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(cfg)
    return model, copy.deepcopy(model), tok, cfg


def training_rows(batch):
    from fastalign.data import DEFAULT_PREFERENCES, load_rows
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows(DEFAULT_PREFERENCES, "train")]
    return [rows[i % len(rows)] for i in range(batch)]


class StepTimer:
    """transformers-style callback: the time of each on_step_end (fastalign's loop and TRL's both call it)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, *args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def _fastalign_trainer(model, ref, tok, rows, out, a, cuda, timer):
    from fastalign.config import DPOConfig
    from fastalign.trainers.dpo import DPOTrainer
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps, max_length=a.max_length,
                    max_prompt_length=a.max_length // 2, learning_rate=LEARNING_RATE, beta=BETA, seed=SEED,
                    bf16=cuda, logging_steps=10**6, disable_tqdm=True, report_to="none")
    return DPOTrainer(model, ref_model=ref, args=cfg, train_dataset=rows, processing_class=tok, callbacks=[timer])


def _trl_trainer(liger):
    def make(model, ref, tok, rows, out, a, cuda, timer):
        import datasets
        import trl
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_step_end(self, *args, **kwargs):
                timer.on_step_end()
        cfg = trl.DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps,
                            max_length=a.max_length, learning_rate=LEARNING_RATE, beta=BETA, seed=SEED, bf16=cuda,
                            use_cpu=not cuda, save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                            report_to="none", use_liger_kernel=liger)
        return trl.DPOTrainer(model, ref_model=ref, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok, callbacks=[Timer()])
    return make


# ---- the variants: (name, factory or why-not string); adding a row is adding one entry --------------------------
# TRL first: it is the baseline, so every later row is streamed with its ratios.
def variants(device):
    if not peers.installed("trl"):
        return [("TRL DPOTrainer", f"trl {peers.MISSING}"), ("fastalign DPOTrainer", _fastalign_trainer),
                ("TRL DPOTrainer + Liger", f"trl {peers.MISSING}")]
    liger = _trl_trainer(True) if peers.installed("liger_kernel") else f"liger-kernel {peers.MISSING}"
    return [("TRL DPOTrainer", _trl_trainer(False)), ("fastalign DPOTrainer", _fastalign_trainer),
            ("TRL DPOTrainer + Liger", liger)]


def batch_tokens(tok, rows, a):
    """Tokens of one batch (prompt + answer, chosen and rejected) as fastalign tokenizes and truncates them."""
    from fastalign.config import DPOConfig
    from fastalign.data.prepare import prepare_examples
    cfg = DPOConfig(max_length=a.max_length, max_prompt_length=a.max_length // 2)
    return sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in prepare_examples(rows, "preference", tok, cfg))


def measure(name, factory, a, device, tokens):
    cuda = device.type == "cuda"
    model, ref, tok, _ = build_model(a.hidden, a.layers, a.vocab)
    rows = training_rows(a.batch)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="fastalign-e2e-") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = factory(model, ref, tok, rows, os.path.join(out, "run"), a, cuda, timer)
        with PeakMemory(device) as mem:
            trainer.train()
    steps = [b - e for e, b in zip(timer.ends, timer.ends[1:])]  # step 2.. (step 1 holds the warm-up)
    if not steps:
        raise RuntimeError(f"{name}: {len(timer.ends)} steps timed, need at least 2 (raise --steps)")
    seconds = statistics.median(steps)
    return dict(variant=name, step_ms=seconds * 1e3, tokens_per_s=tokens / seconds, peak_mib=mem.peak_bytes / 2**20,
                steps_timed=len(steps))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, help_ in (("batch", "preference pairs per step"), ("max_length", "maximum tokens of prompt + answer"),
                     ("steps", "optimizer steps (the first is warm-up)"), ("hidden", "hidden size (default: the tiny "
                      "config's 64 on CPU)"), ("layers", "decoder layers"), ("vocab", "vocabulary size (default: "
                                                                              "the byte tokenizer's on CPU)")):
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=int,
                       help=f"{help_}; default {DEFAULTS['cpu'][k]} on CPU, {DEFAULTS['cuda'][k]} on CUDA")
    p.add_argument("--tag", default="", help="suffix of the result file names (several runs on one day)")
    add_common_args(p)
    return p


COLUMNS = [("shape", "model / batch", None), ("variant", "trainer", None), ("step_ms", "step (ms)", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:.0f}"), ("speed_vs_trl", "tokens/s vs TRL", "{:.2f}x"),
           ("peak_mib", "peak (MiB)", "{:.0f}"), ("memory_vs_trl", "memory vs TRL", "{:.2f}x"), ("note", "note", None)]


def run(args):
    """Measure what args ask for; returns (env, rows, table, exit status). Used by `fastalign bench` too."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = DEFAULTS["dryrun" if dryrun() else device.type]
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
        x = getattr(args, k)
        if x is not None and x < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {x}")
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2 (the first step is warm-up), got {args.steps}")
    if args.max_length < 8:
        raise ValueError(f"--max-length must be at least 8, got {args.max_length}")
    env = environment()
    stream = JsonlStream(args.jsonl, "e2e_dpo", env)
    _, _, tok, cfg = build_model(args.hidden, args.layers, args.vocab)
    tokens = batch_tokens(tok, training_rows(args.batch), args)
    shape = (f"Llama H={cfg.hidden_size} L={cfg.num_hidden_layers} V={cfg.vocab_size}, {args.batch} pairs, "
             f"max_length {args.max_length}, {'bf16' if device.type == 'cuda' else 'fp32'}")
    fields = dict(shape=shape, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size,
                  batch=args.batch, max_length=args.max_length, steps=args.steps, tokens_per_step=tokens)
    rows = []
    for name, factory in variants(device):
        if isinstance(factory, str):
            rows.append(stream.row(dict(fields, variant=name, skipped=factory)))
            continue
        print(f"  {name}: {args.steps} steps", file=sys.stderr)
        try:
            row = dict(fields, **measure(name, factory, args, device, tokens))
        except Exception as exc:  # a peer that cannot run here: the others still run
            why = f"{type(exc).__name__}: {exc}"[:300]
            if "Liger" in name and device.type != "cuda":
                why = "needs CUDA: use_liger_kernel patches the model with Liger's Triton kernels (RMSNorm, RoPE, " \
                      f"SwiGLU; triton has no CPU driver) [{why[:120]}]"
            print(f"  {name}: failed ({why})", file=sys.stderr)
            rows.append(stream.row(dict(fields, variant=name, error=why)))
            continue
        trl_row = next((r for r in rows + [row] if r["variant"] == "TRL DPOTrainer" and "step_ms" in r), None)
        if trl_row is not None:
            row["speed_vs_trl"] = row["tokens_per_s"] / trl_row["tokens_per_s"]
            row["memory_vs_trl"] = row["peak_mib"] / max(trl_row["peak_mib"], 1e-9)
        rows.append(stream.row(row))
        print(f"  {name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"{row['peak_mib']:.0f} MiB", file=sys.stderr)
    for r in rows:
        r["note"] = r.get("skipped") or r.get("error") or ""
    stream.close()
    return env, rows, markdown_table(rows, COLUMNS), 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    env, rows, table, status = run(args)
    publish("e2e_dpo" + (f"-{args.tag}" if args.tag else ""), env, rows, table, args.out,
            [r for r in rows if "speed_vs_trl" in r],
            [("speed_vs_trl", "tokens/s vs TRL DPOTrainer"), ("memory_vs_trl", "peak memory vs TRL")],
            versions=f", trl {env['peers']['trl']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
