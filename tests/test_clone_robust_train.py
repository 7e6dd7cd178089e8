"""Clone-robust training: pair weights w(chosen) * w(rejected) in the reward and DPO trainers, the disk cache,
the encoders, and `fastalign weights`."""
import json

import pytest
import torch

from fastalign.clone_robust_train import alternative_weights, alternatives_of, pair_weights
from fastalign.config import ConfigError, DPOConfig, RewardConfig
from fastalign.data import byte_tokenizer, default_model_and_tokenizer, tokenize_preference_rows
from fastalign.trainer import DPOTrainer, RewardTrainer


def rows():
    """Two prompts; under each, answer 'a' vs several answers, three of them near-copies of one another."""
    out = []
    for p in ("Is the sky blue?", "Is water wet?"):
        answers = [" yes it is", " no it is not", " maybe so", " maybe so.", " maybe so!"]
        for other in answers[1:]:
            out.append(dict(prompt=p, chosen=answers[0], rejected=other))
    return out


def cfg(cls, tmp, **kw):
    base = dict(output_dir=str(tmp), learning_rate=1e-3, max_steps=1, per_device_train_batch_size=4, max_length=64,
                max_prompt_length=32, disable_tqdm=True, clone_robust=True, clone_robust_num_samples=2000)
    base.update(kw)
    return cls(**base)


def test_alternatives_grouped_by_prompt():
    ex = tokenize_preference_rows(rows(), byte_tokenizer(), 64, 32)
    seqs, groups, chosen, rejected = alternatives_of(ex)
    assert len(seqs) == 10 and groups.tolist() == [0] * 5 + [1] * 5
    assert chosen.tolist() == [0] * 4 + [5] * 4 and rejected.tolist() == [1, 2, 3, 4, 6, 7, 8, 9]


def test_pair_weights_are_products_scaled_to_mean_one():
    w = torch.tensor([0.5, 0.2, 0.3])
    pw = pair_weights(w, torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert torch.allclose(pw, torch.tensor([0.1, 0.15]) / 0.125)


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_trainers_weight_pairs_and_cache(tmp_path, kind):
    cls, trainer = (RewardConfig, RewardTrainer) if kind == "rm" else (DPOConfig, DPOTrainer)
    model, tok = default_model_and_tokenizer("reward" if kind == "rm" else "causal-lm", seed=0)
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return torch.tensor([[len(t), t.count("!") + t.count(".")] for t in texts], dtype=torch.float64)
    t = trainer(model, tokenizer=tok, train_dataset=rows(), config=cfg(cls, tmp_path, clone_robust_encoder=encoder))
    w = torch.tensor([e["weight"] for e in t.train_examples])
    assert abs(float(w.mean()) - 1) < 1e-5 and float(w.std()) > 0.05
    alt = t.clone_robust_alternative_weights
    for g in (slice(0, 5), slice(5, 10)):
        assert abs(float(alt[g].sum()) - 1) < 1e-5
    t.train()
    assert len(list((tmp_path / "clone_robust_cache").glob("clone_weights-*.safetensors"))) == 1
    trainer(model, tokenizer=tok, train_dataset=rows(), config=cfg(cls, tmp_path, clone_robust_encoder=encoder))
    assert len(calls) == 1  # the second trainer read the cache


def test_model_encoder_runs_one_pass(tmp_path):
    model, tok = default_model_and_tokenizer(seed=0)
    ex = tokenize_preference_rows(rows(), tok, 64, 32)
    w, seqs, _, _ = alternative_weights(ex, model=model, tokenizer=tok, num_samples=1000, backend="torch",
                                        cache_dir=str(tmp_path))
    assert w.shape == (len(seqs),) and torch.isfinite(w).all()
    assert abs(float(w[:5].sum()) - 1) < 1e-5


def test_bad_clone_robust_options(tmp_path):
    with pytest.raises(ConfigError, match="clone_robust_group_by"):
        RewardConfig(clone_robust_group_by="answer")
    with pytest.raises(ConfigError, match="clone_robust_encoder"):
        DPOConfig(clone_robust_encoder=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="clone_robust_num_samples"):
        DPOConfig(clone_robust_num_samples=0)


def test_cli_weights_writes_a_weight_column(tmp_path):
    from fastalign.cli import main
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = tmp_path / "prefs.weighted.jsonl"
    assert main(["weights", "--data", str(data), "--out", str(out), "--num-samples", "2000"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 8 and all(r["weight"] >= 0 for r in written)
    assert abs(sum(r["weight"] for r in written) / 8 - 1) < 1e-5
    assert written[0]["prompt"] == rows()[0]["prompt"] and "chosen_weight" in written[0]


def test_cli_flags_come_from_the_config():
    from fastalign.cli import build_parser
    args = build_parser().parse_args(["train", "rm", "--clone-robust", "true", "--clone-robust-dim", "4",
                                      "--clone-robust-group-by", "none"])
    assert args.clone_robust is True and args.clone_robust_dim == 4 and args.clone_robust_group_by == "none"
    args = build_parser().parse_args(["train", "dpo", "--clone-robust", "true", "--clone-robust-encoder", "ngram"])
    assert args.clone_robust is True and args.clone_robust_encoder == "ngram"


def test_cli_weights_keeps_rows_aligned_when_tokenization_drops_a_pair(tmp_path, capsys):
    """Row 1's answers are identical once cut to --max-length, so tokenization drops it: every other row must
    keep its own weight (they used to shift up by one, the last row was lost) and row 1 is written unchanged."""
    from fastalign.cli import main
    long = "a" * 40
    data = [dict(prompt="Q1", chosen="short yes", rejected="nope"),
            dict(prompt="Q1", chosen=long + "X", rejected=long + "Y"),
            dict(prompt="Q1", chosen="short yes", rejected="maybe later"),
            dict(prompt="Q2", chosen="blue", rejected="red"),
            dict(prompt="Q2", chosen="green", rejected="red", weight=2.0)]
    src, kept_src = tmp_path / "prefs.jsonl", tmp_path / "kept.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in data))
    kept_src.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(data) if i != 1))
    flags = ["--max-length", "24", "--max-prompt-length", "8", "--num-samples", "2000"]
    with pytest.warns(UserWarning, match=r"1 of 5 pair\(s\) were dropped in tokenization .*prefs.jsonl:2"):
        assert main(["weights", "--data", str(src), "--out", str(tmp_path / "w.jsonl")] + flags) == 0
    assert "wrote 5 rows" in capsys.readouterr().out
    assert main(["weights", "--data", str(kept_src), "--out", str(tmp_path / "kept.w.jsonl")] + flags) == 0
    written = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "kept.w.jsonl").read_text().splitlines()]
    assert len(written) == 5 and [r["chosen"] for r in written] == [r["chosen"] for r in data]
    assert written[1] == dict(data[1], weight=1.0)  # unweighted: no chosen_weight / rejected_weight
    assert [written[i] for i in (0, 2, 3, 4)] == reference  # the weights of the rows that remain, each on its row


def test_cli_weights_refuses_to_write_over_its_input(tmp_path):
    from fastalign.cli import main
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    before = data.read_text()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(data)
    for out in (data, tmp_path / "sub" / ".." / "prefs.jsonl", tmp_path / "link.jsonl"):
        with pytest.raises(ValueError, match="is the --data file"):
            main(["weights", "--data", str(data), "--out", str(out), "--num-samples", "2000", "--debug"])
    assert data.read_text() == before
