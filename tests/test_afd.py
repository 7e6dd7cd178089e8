"""AfD: the BCE discriminator trainer against a naive rewrite, AUC, reward rows, the resumable pipeline, the CLI."""
import json
import os

import pytest
import torch

import fastalign as fa
from fastalign import afd
from fastalign.config import ConfigError
from fastalign.data import DataError, default_model_and_tokenizer
from fastalign.trainers.afd_reward import binary_auc
from tests.backends import free_port

ROWS = [{"prompt": "ab:", "answer": "aab", "label": 1}, {"prompt": "cd:", "answer": "xyz", "label": 0},
        {"prompt": "ef:", "completion": "a much longer answer", "label": True},
        {"prompt": "gh:", "answer": "q", "label": 0.0}]


def _config(tmp_path, **kw):
    opts = dict(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4,
                max_length=32, max_prompt_length=8, report_to="none", disable_tqdm=True)
    return fa.AfDRewardConfig(**{**opts, **kw})


def test_bce_loss_and_gradients_match_naive(tmp_path):
    rm, tok = default_model_and_tokenizer("reward", seed=0)
    trainer = fa.AfDRewardTrainer(rm, tokenizer=tok, train_dataset=ROWS, config=_config(tmp_path))
    batch = trainer._collate(trainer.train_examples)
    out = trainer.step_module(batch, None)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad()
    # naive: each row alone through the Hugging Face forward (no padding), BCE written out in float64
    losses = []
    for r in ROWS:
        answer = r.get("answer", r.get("completion"))
        ids = [tok.bos_token_id] + tok(r["prompt"] + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        s = rm(torch.tensor([ids])).logits[0, 0].double()
        y = float(r["label"])
        losses.append(-(y * torch.log(torch.sigmoid(s)) + (1 - y) * torch.log(1 - torch.sigmoid(s))))
    naive = torch.stack(losses).mean()
    naive.backward()
    torch.testing.assert_close(out.loss.double(), naive, atol=1e-6, rtol=1e-6)
    for n, p in rm.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert set(trainer._metrics_of(out)) == {"loss", "rewards/accuracies", "rewards/positive", "rewards/negative"}


def test_binary_auc_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = s[y == 1], s[y == 0]
    want = float(((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean())
    assert binary_auc(s, y) == pytest.approx(want, abs=1e-12)
    assert binary_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])) != binary_auc(torch.tensor([1.0]), [1])  # nan


def test_trainer_trains_evaluates_and_resumes(tmp_path):
    rows = [{"prompt": f"{c}:", "answer": "aaaa" if k % 2 else "zzzz", "label": k % 2}
            for k, c in enumerate("abcdefghijklmnop")]
    rm, tok = default_model_and_tokenizer("reward", seed=0)
    cfg = _config(tmp_path, max_steps=4, save_steps=2)
    trainer = fa.AfDRewardTrainer(rm, tokenizer=tok, train_dataset=rows, eval_dataset=rows, config=cfg)
    history = trainer.train()
    m = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_auc", "eval_rewards/margins"} <= set(m)
    assert 0 <= m["eval_auc"] <= 1
    assert history[-1]["step"] == 4 and os.path.isdir(tmp_path / "rm" / "checkpoint-4")
    # resume from step 2 reaches the same weights as the uninterrupted run
    rm2, _ = default_model_and_tokenizer("reward", seed=0)
    # (resuming an earlier checkpoint abandons the later ones: the run must say so with overwrite_output_dir)
    t2 = fa.AfDRewardTrainer(rm2, tokenizer=tok, train_dataset=rows, eval_dataset=rows,
                             config=_config(tmp_path, max_steps=4, save_steps=0, overwrite_output_dir=True))
    t2.train(resume_from_checkpoint=str(tmp_path / "rm" / "checkpoint-2"))
    for (n, a), b in zip(rm.state_dict().items(), rm2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda msg: f"{n}: {msg}")


def test_bad_rows_and_options(tmp_path):
    rm, tok = default_model_and_tokenizer("reward", seed=0)
    with pytest.raises(DataError, match="row 1: label must be 0 or 1, got 2"):
        fa.AfDRewardTrainer(rm, tokenizer=tok, config=_config(tmp_path),
                            train_dataset=[ROWS[0], {**ROWS[1], "label": 2}, *ROWS[2:]])
    with pytest.raises(DataError, match="only label 1"):
        fa.AfDRewardTrainer(rm, tokenizer=tok, config=_config(tmp_path), train_dataset=[ROWS[0]] * 4)
    with pytest.raises(DataError, match="row 0: needs prompt, answer"):  # in memory: 0-based rows
        fa.AfDRewardTrainer(rm, tokenizer=tok, config=_config(tmp_path), train_dataset=[{"prompt": "a"}] * 4)
    with pytest.raises(ConfigError, match="unknown rm_kind 'sft-init'"):
        fa.AfDRewardConfig(rm_kind="sft-init")
    with pytest.raises(ConfigError, match="padding_free"):
        fa.AfDRewardConfig(padding_free=True)
    lm, _ = default_model_and_tokenizer(seed=0)
    with pytest.raises(TypeError, match="sequence-classification"):
        fa.AfDRewardTrainer(lm, tokenizer=tok, config=_config(tmp_path), train_dataset=ROWS)


def test_reward_rows_by_kind():
    demos = [{"prompt": "p", "completion": "demo"}]
    init = [{"prompt": "p", "completion": "init"}]
    sft = [{"prompt": "p", "completion": "sft"}]
    pairs = {k: {(r["answer"], r["label"]) for r in afd.reward_rows(k, demos=demos, init_samples=init,
                                                                   sft_samples=sft)}
             for k in ("init-sft", "init-demo", "sft-demo")}
    assert pairs == {"init-sft": {("sft", 1), ("init", 0)}, "init-demo": {("demo", 1), ("init", 0)},
                     "sft-demo": {("demo", 1), ("sft", 0)}}
    with pytest.raises(ValueError, match="needs sft_samples"):
        afd.reward_rows("init-sft", demos=demos, init_samples=init)
    rows = [{"prompt": str(k % 10), "label": k % 2} for k in range(40)]
    train, held = afd.split_by_prompt(rows, 0.2, seed=0)
    assert len(held) == 8 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}


@pytest.fixture()
def saved_models(tmp_path):
    for name, seed in (("init", 0), ("sft", 1)):
        model, tok = default_model_and_tokenizer(seed=seed)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with open(tmp_path / "demos.jsonl", "w") as f:
        for k in range(8):
            f.write(json.dumps({"prompt": f"{'abcdefgh'[k]}b:", "completion": "ab"}) + "\n")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.write('{"prompt": "xy:"}\n{"prompt": "zw:"}\n')
    return tmp_path


def test_afd_cli_runs_stages_once(saved_models, monkeypatch, capsys):
    from fastalign.cli import main
    d = saved_models
    with open(d / "rm.yaml", "w") as f:
        f.write("max_steps: 2\nper_device_train_batch_size: 4\nlearning_rate: 0.001\nreport_to: none\n"
                "eval_fraction: 0.25\nmax_length: 32\nmax_prompt_length: 8\ndisable_tqdm: true\n")
    argv = ["afd", "--init-model", str(d / "init"), "--sft-model", str(d / "sft"), "--demos", str(d / "demos.jsonl"),
            "--prompts", str(d / "prompts.jsonl"), "--n", "3", "--max-new-tokens", "3", "--rm-config",
            str(d / "rm.yaml"), "--output-dir", str(d / "out")]
    assert main(argv) == 0
    bon = [json.loads(line) for line in open(d / "out" / "best_of_n.jsonl")]
    assert [r["prompt"] for r in bon] == ["xy:", "zw:"] and all(len(r["scores"]) == 3 for r in bon)
    assert all(r["completion"] == r["candidates"][max(range(3), key=lambda k: r["scores"][k])] for r in bon)
    assert sorted(os.listdir(d / "out" / "stages")) == [f"{s}.done" for s in sorted(afd.STAGES)]
    capsys.readouterr()

    # a rerun redoes nothing: sampling or training again would fail
    def boom(*a, **k):
        raise AssertionError("a finished stage was redone")
    monkeypatch.setattr(afd, "sample", boom)
    monkeypatch.setattr(afd, "best_of_n", boom)
    monkeypatch.setattr("fastalign.trainers.afd_reward.AfDRewardTrainer.train", boom)
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done already") == 4
    # an interrupted stage (no done-file) is redone, the others are not
    os.remove(d / "out" / "stages" / "best-of-n.done")
    with pytest.raises(AssertionError, match="redone"):
        main(argv)
    # other settings in the same folder are refused
    assert main(argv[:-2] + ["--seed", "5", "--output-dir", str(d / "out")]) == 2
    assert "other settings (differ: seed)" in capsys.readouterr().err
    # a folder another run holds is refused before any stage starts
    from fastalign.trainers.runlog import OutputDirLock
    with OutputDirLock(str(d / "out")):
        assert main(argv) == 1  # the CLI's status for a run-state error, as for the trainers
    assert "is in use by another run" in capsys.readouterr().err


def test_cli_bad_inputs(saved_models, capsys):
    from fastalign.cli import main
    d = saved_models
    (d / "empty.jsonl").write_text("")
    assert main(["sample", "--model", str(d / "init"), "--prompts", str(d / "empty.jsonl"),
                 "--output", str(d / "s.jsonl")]) == 2
    assert "empty.jsonl: the file is empty" in capsys.readouterr().err
    (d / "bad.jsonl").write_text('{"text": "hi"}\n')
    assert main(["sample", "--model", str(d / "init"), "--prompts", str(d / "bad.jsonl"),
                 "--output", str(d / "s.jsonl")]) == 2
    assert "bad.jsonl:1: field 'prompt': missing (each row needs a 'prompt'; the row has 'text')" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # checked when the arguments are parsed
        main(["afd", "--init-model", str(d / "init"), "--sft-model", str(d / "sft"), "--demos",
              str(d / "demos.jsonl"), "--n", "0", "--output-dir", str(d / "o")])
    assert exit_info.value.code == 2
    assert "argument --n: expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["sample", "--model", str(d / "init"), "--prompts", str(d / "prompts.jsonl"), "--n", "2",
                 "--max-new-tokens", "2", "--output", str(d / "s.jsonl")]) == 0
    assert len(open(d / "s.jsonl").readlines()) == 4


def _run_worker(tmp_path, nproc, name):
    import subprocess
    import sys
    worker = os.path.join(os.path.dirname(__file__), "afd_ddp_worker.py")
    # CPU and gloo on any machine (CUDA hidden): with one GPU, rank 1 would ask for cuda:1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, worker] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         worker]
    out = tmp_path / f"{name}.json"
    r = subprocess.run(cmd + [str(out), "4", str(tmp_path / name)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    one = _run_worker(tmp_path, 1, "one")
    two = _run_worker(tmp_path, 2, "two")
    assert two["world"] == 2 and one["world"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_afd_demo_runs(tmp_path):
    from fastalign import afd_demo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs: a model this small is slower with more threads
    try:
        res = afd_demo.run(str(tmp_path), rm_steps=2, sft_steps=2, pretrain_steps=2, samples_per_prompt=1, limit=40,
                           log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert set(res["best_of_n"]) == {"RM init-sft", "RM init-demo", "RM sft-demo", "log-ratio sft/init"}
    assert all(len(v) == len(afd_demo.NS) and all(0 <= x <= 1 for x in v) for v in res["best_of_n"].values())
    assert afd_demo.gold_score("abc:", "aaxyzb") == pytest.approx(0.5) and afd_demo.gold_score("a:", "") == 0.0
    assert afd_demo.plot(res, str(tmp_path / "afd.png")) is None or os.path.getsize(tmp_path / "afd.png") > 0


def test_trainer_takes_trl_names(tmp_path):
    rows = [{"prompt": f"{c}:", "answer": "aaaa" if k % 2 else "zzzz", "label": k % 2} for k, c in enumerate("abcdefgh")]
    rm, tok = default_model_and_tokenizer("reward", seed=0)
    t = fa.AfDRewardTrainer(rm, args=_config(tmp_path), processing_class=tok, train_dataset=rows)
    assert t.tokenizer is tok and t.config.output_dir == str(tmp_path / "rm")
    with pytest.raises(TypeError, match="not both"):
        fa.AfDRewardTrainer(rm, tokenizer=tok, processing_class=tok, train_dataset=rows, config=_config(tmp_path))
