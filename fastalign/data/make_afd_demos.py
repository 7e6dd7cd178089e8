"""Writes afd_demos.jsonl, the synthetic data of the AfD demo (`python -m fastalign.data.make_afd_demos`).

A prompt is three distinct letters of a-l and ':' (e.g. "keg:"); an answer is six letters. split "pretrain":
answers drawn uniformly from a-l (what the initial model learns; a letter is in the prompt 1/4 of the time);
split "demo": the synthetic expert's demonstrations, each letter drawn from the prompt's letters with probability
0.8 and otherwise from the other nine; split "test": held-out prompts, no answer. Fixed seed: the file is
reproducible.
"""
import json
import os
import random

ALPHABET = "abcdefghijkl"
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
            others = [c for c in ALPHABET if c not in letters]
            if split == "pretrain":
                answer = "".join(rng.choice(ALPHABET) for _ in range(ANSWER_LEN))
            else:
                answer = "".join(rng.choice(letters) if rng.random() < EXPERT_P else rng.choice(others)
                                 for _ in range(ANSWER_LEN))
            rows.append({"prompt": prompt, "completion": answer, "split": split})
    return rows


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "afd_demos.jsonl")
    with open(path, "w") as f:
        for r in make_rows():
            f.write(json.dumps(r) + "\n")
    print(f"wrote {path}")
