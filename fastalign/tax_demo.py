"""`make tax-demo`: the alignment tax and model averaging (Lin et al. 2023) on the embedded tiny Llama, on CPU.

1. "pre": the tiny model learns general text (embedded synthetic sentences) with the fused SFT loss.
2. "post": the pre model is aligned with DPO on the embedded persona preferences, hard enough to forget some of
   the general text (its held-out perplexity rises).
3. The tax curve: for weights on pre 0, 0.1, ..., 1, plain averaging and HMA (K=3 groups, ratios fitted on the
   training preferences' chosen answers) are scored on held-out preference pairs (reward accuracy against the
   pre model, ties = 1/2) and held-out general text (NLL). Prints a table and the measured verdicts, writes
   tax.json and tax.png. Nothing is downloaded.
"""
import argparse
import os
import sys
import time

import torch

from fastalign.averaging import _nll
from fastalign.data import DATA_DIR, DEFAULT_PREFERENCES, byte_tokenizer, load_rows, tiny_llama_config, tokenize_pair
from fastalign.tax import alignment_tax, dominance, markdown_table, plot_tax, write_json

GENERAL_TEXT = os.path.join(DATA_DIR, "general_text.jsonl")


def pretrain(model, tokenizer, rows, steps, lr, batch_size=32, seed=0):
    """Plain LM training on text rows through the fused SFT loss (the 'pre' model's general ability)."""
    examples = [tokenize_pair(tokenizer, "", r["text"], 128, 64) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    from tqdm.auto import tqdm
    for _ in tqdm(range(steps), desc="pretrain on general text", dynamic_ncols=True, leave=False):
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        loss = _nll(model, [examples[i] for i in idx], tokenizer.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--dpo-steps", type=int, default=300)
    p.add_argument("--dpo-lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=6, help="decoder blocks of the tiny Llama (HMA splits them)")
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--fit-steps", type=int, default=40)
    p.add_argument("--output-dir", default="demo_out/tax")
    args = p.parse_args(argv)
    t0 = time.time()
    import transformers

    from fastalign.config import DPOConfig
    from fastalign.trainers import DPOTrainer
    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = tiny_llama_config(len(tok), num_hidden_layers=args.layers, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    general_train, general_test = load_rows(GENERAL_TEXT, "train"), load_rows(GENERAL_TEXT, "test")
    prefs_train, prefs_test = load_rows(DEFAULT_PREFERENCES, "train"), load_rows(DEFAULT_PREFERENCES, "test")
    pre = pretrain(transformers.LlamaForCausalLM(cfg), tok, general_train, args.pretrain_steps, lr=3e-3)
    post = transformers.LlamaForCausalLM(cfg)
    post.load_state_dict(pre.state_dict())
    config = DPOConfig(output_dir=os.path.join(args.output_dir, "dpo"), learning_rate=args.dpo_lr, beta=0.5,
                       max_steps=args.dpo_steps, per_device_train_batch_size=8, max_length=96, max_prompt_length=64,
                       warmup_ratio=0.05, lr_scheduler_type="constant_with_warmup", logging_steps=50,
                       report_to="none", disable_tqdm=False, overwrite_output_dir=True)
    DPOTrainer(post, tokenizer=tok, train_dataset=prefs_train, config=config).train()
    post.eval()
    result = alignment_tax(pre, post, tok, prefs_test, general_test, beta=0.5, hma_groups=args.groups,
                           fit_data=prefs_train, fit_steps=args.fit_steps)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(result, os.path.join(args.output_dir, "tax.json"))
    png = plot_tax(result, os.path.join(args.output_dir, "tax.png"))
    print(f"\nfastalign alignment-tax demo: tiny Llama ({args.layers} blocks), {args.pretrain_steps} pretraining steps, "
          f"{args.dpo_steps} DPO steps, HMA K={args.groups}; {time.time() - t0:.0f} s on CPU\n")
    print(markdown_table(result))
    pre_m, post_m = result["pre"], result["post"]
    forgetting = post_m["nll"] - pre_m["nll"]
    print(f"\npre:  general NLL {pre_m['nll']:.4f}   post: general NLL {post_m['nll']:.4f} (forgetting "
          f"{forgetting:+.4f}), reward accuracy {post_m['reward_accuracy']:.3f}")
    avg = {r["weight_on_pre"]: r for r in result["rows"] if r["method"] == "average"}
    for a in (0.3, 0.5, 0.7):
        if a in avg and forgetting > 0:
            r = avg[a]
            bought = (post_m["nll"] - r["nll"]) / forgetting
            print(f"averaging at weight_on_pre={a}: buys back {100 * bought:.0f}% of the forgetting; held-out reward "
                  f"accuracy {r['reward_accuracy']:.3f} vs the aligned model's {post_m['reward_accuracy']:.3f}")
    gaps = dominance(result)
    if gaps:
        above = sum(g > 0 for _, g in gaps)
        print(f"HMA above the averaging curve (more alignment at equal forgetting) at {above} of {len(gaps)} ratios; "
              "gaps in reward accuracy: " + ", ".join(f"{a:.1f}: {g:+.3f}" for a, g in gaps))
    if png:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
