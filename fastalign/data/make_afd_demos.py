"""Writes afd_demos.jsonl, the synthetic data of the AfD demo (`python -m fastalign.data.make_afd_demos`).

A prompt is three distinct letters of a-l and ':' (e.g. "keg:"); an answer is six letters. split "pretrain":
answers drawn uniformly from a-l (what the initial model learns; a letter is one of the expert's favourites
a, b, c, d a third of the time); split "demo": the synthetic expert's demonstrations, each letter one of its
favourites with probability 0.8, otherwise one of the other eight; split "test": held-out prompts, no answer.
The gold reward of an answer (fastalign.afd_demo.gold_score) is the fraction of its letters that are favourites.
Fixed seed: the file is reproducible.
"""
import json
import os
import random

ALPHABET = "abcdefghijkl"
FAVOURITES = "abcd"
EXPERT_P = 0.8
ANSWER_LEN = 6
COUNTS = {"pretrain": 1200, "demo": 240, "test": 64}


def make_rows(seed=0):
    rng = random.Random(seed)
    rows, seen = [], set()
    for split, count in COUNTS.items():
        for _ in range(count):
            while True:  # test prompts never appear in training
                letters = "".join(rng.sample(ALPHABET, 3))
                if split != "test" or letters not in seen:
                    break
            if split != "test":
                seen.add(letters)
            prompt = letters + ":"
            if split == "test":
                rows.append({"prompt": prompt, "split": split})
                continue
            others = [c for c in ALPHABET if c not in FAVOURITES]
            if split == "pretrain":
                answer = "".join(rng.choice(ALPHABET) for _ in range(ANSWER_LEN))
            else:
                answer = "".join(rng.choice(FAVOURITES) if rng.random() < EXPERT_P else rng.choice(others)
                                 for _ in range(ANSWER_LEN))
            rows.append({"prompt": prompt, "completion": answer, "split": split})
    return rows


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "afd_demos.jsonl")
    with open(path, "w") as f:
        for r in make_rows():
            f.write(json.dumps(r) + "\n")
    print(f"wrote {path}")
