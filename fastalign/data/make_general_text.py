"""Generates the embedded general-text corpus `general_text.jsonl` (run: python -m fastalign.data.make_general_text).

Short plain sentences from a small grammar, written for fastalign: the "general ability" a tiny model learns
before alignment in the alignment-tax demo (`make tax-demo`), measured afterwards as held-out perplexity.
Columns: text, split (train / test).
"""
import json
import os
import random

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the old man", "a small bird",
            "the farmer", "her brother", "the baker", "a young girl", "the captain"]
VERBS = ["sees", "likes", "finds", "paints", "carries", "watches", "cleans", "follows", "builds", "opens"]
OBJECTS = ["the red box", "a green apple", "the wooden door", "a long road", "the blue boat", "a warm coat",
           "the quiet garden", "a tall tree", "the bright lamp", "a new book"]
PLACES = ["in the morning", "near the river", "after lunch", "at the market", "on sunday", "by the window",
          "before dinner", "in the park"]


def sentences(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        if rng.random() < 0.4:
            s += f" then {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
        out.append(s[0].upper() + s[1:])
    return out


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "general_text.jsonl")):
    rows = [{"text": t, "split": "train"} for t in sentences(600, seed=1)]
    rows += [{"text": t, "split": "test"} for t in sentences(120, seed=2)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


if __name__ == "__main__":
    print(main())
