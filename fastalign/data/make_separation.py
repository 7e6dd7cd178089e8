"""Generates `separation.jsonl`, preference data whose distinguishability is set by construction
(run: python -m fastalign.data.make_separation [--levels 1,2,4,8]).

Every group uses the same prompts and the same vocabulary of word pairs (a preferred word and its
non-preferred twin). An answer is WORDS words drawn from the preferred words; its rejected twin swaps ``k`` of
them for their non-preferred twins, and ``k`` is the only thing that differs between groups ("differ-<k>"): the
more words differ, the further apart the preferred and rejected answers are. Columns: prompt, chosen, rejected,
behaviour (the group), split (train/test).
"""
import argparse
import json
import os
import random

WORDS = 8
# preferred word -> its non-preferred twin (same length where possible, so token counts match)
PAIRS = [("calm", "rude"), ("clear", "vague"), ("kind", "mean"), ("exact", "wrong"), ("brief", "messy"),
         ("safe", "rash"), ("true", "fake"), ("fair", "vile"), ("warm", "cold"), ("wise", "dumb")]
TOPICS = ["rivers", "gardens", "trains", "bread", "clocks", "maps", "bees", "kites", "lamps", "boats", "tea",
          "stars", "shoes", "bridges", "owls", "rain", "paper", "chess", "salt", "wool", "glass", "caves", "drums",
          "ferns", "ice", "honey", "ropes", "tides", "moss", "bells"]
LEVELS = (1, 2, 4, 8)


def rows(levels=LEVELS, seed=0, test_fraction=0.25):
    """One pair per (topic, level): same prompts for every level; test pairs use held-out topics."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    n_test = int(len(topics) * test_fraction)
    out = []
    for t_i, topic in enumerate(topics):
        for k in levels:
            if not 1 <= k <= WORDS:
                raise ValueError(f"a level is a number of differing words in 1..{WORDS}, got {k}")
            picks = [rng.randrange(len(PAIRS)) for _ in range(WORDS)]
            swap = set(rng.sample(range(WORDS), k))
            chosen = [PAIRS[p][0] for p in picks]
            rejected = [PAIRS[p][1] if i in swap else PAIRS[p][0] for i, p in enumerate(picks)]
            out.append({"prompt": f"Describe {topic} in {WORDS} words.\nAnswer:",
                        "chosen": " " + " ".join(chosen) + ".", "rejected": " " + " ".join(rejected) + ".",
                        "behaviour": f"differ-{k}",
                        "split": "test" if t_i < n_test else "train"})
    rng.shuffle(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="numbers of differing words, one group each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "separation.jsonl"))
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    with open(args.output, "w") as f:
        for r in rows(levels, args.seed):
            f.write(json.dumps(r) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
