"""Model averaging and HMA (issue: the alignment tax): exactness, groups, the ratio gradient, streaming merge."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import fastalign as fa
from fastalign.averaging import AveragingError, hma_ratio_grad, project_ratios
from fastalign.cli import main as cli_main
from fastalign.cli.averaging import parse_grid
from fastalign.data import byte_tokenizer, tiny_llama_config
from fastalign.merge import streaming_merge


def tiny(seed, layers=4, dtype=torch.float32, **kw):
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tok), num_hidden_layers=layers, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    return transformers.LlamaForCausalLM(cfg).to(dtype), tok


@pytest.fixture(scope="module")
def pair():
    (pre, tok), (post, _) = tiny(0), tiny(1)
    return pre, post, tok


def test_average_exact_at_ends_and_linear_between(pair):
    pre, post, _ = pair
    before = {k: v.clone() for k, v in post.state_dict().items()}
    for a in (0.0, 1.0):
        m = fa.average_models(pre, post, weight_on_pre=a)
        src = pre if a == 1.0 else post
        for k, v in m.state_dict().items():
            assert torch.equal(v, src.state_dict()[k]), k
    m = fa.average_models(pre, post, weight_on_pre=0.3)
    for k, v in m.state_dict().items():
        want = 0.3 * pre.state_dict()[k].double() + 0.7 * post.state_dict()[k].double()
        torch.testing.assert_close(v.double(), want, rtol=0, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in post.state_dict().items())  # inputs untouched
    assert m is not post and type(m) is type(post)


def test_average_state_dicts_and_dtype_kept():
    pre = {"w": torch.randn(5, 3).bfloat16(), "step": torch.tensor(3)}
    post = {"w": torch.randn(5, 3).bfloat16(), "step": torch.tensor(7)}
    out = fa.average_models(pre, post, weight_on_pre=0.25)
    assert isinstance(out, dict) and list(out) == ["w", "step"]
    assert out["w"].dtype == torch.bfloat16
    want = (0.25 * pre["w"].float() + 0.75 * post["w"].float()).bfloat16()  # fp32 math, one final rounding
    assert torch.equal(out["w"], want)
    assert int(out["step"]) == 7  # integer buffers are not averaged: post's value


@pytest.mark.parametrize("bad, match", [(-0.1, "weight_on_pre"), (1.5, "weight_on_pre"), ("0.5", "weight_on_pre")])
def test_bad_ratio(pair, bad, match):
    with pytest.raises(ValueError, match=match):
        fa.average_models(pair[0], pair[1], weight_on_pre=bad)


def test_mismatch_errors_name_the_tensor(pair):
    pre, post, _ = pair
    sd_pre, sd_post = pre.state_dict(), dict(post.state_dict())
    bad = dict(sd_post)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(AveragingError, match="model.norm.weight.*shape"):
        fa.average_models(sd_pre, bad, weight_on_pre=0.5)
    bad = dict(sd_post)
    del bad["lm_head.weight"]
    with pytest.raises(AveragingError, match="lm_head.weight"):
        fa.average_models(sd_pre, bad, weight_on_pre=0.5)
    bad = dict(sd_post)
    bad["lm_head.weight"] = bad["lm_head.weight"].double()
    with pytest.raises(AveragingError, match="lm_head.weight.*dtype|lm_head.weight.*float64"):
        fa.average_models(sd_pre, bad, weight_on_pre=0.5)
    with pytest.raises(TypeError, match="two models or two state dicts"):
        fa.average_models(pre, sd_post, weight_on_pre=0.5)


@pytest.mark.parametrize("layers, k", [(4, 3), (2, 2), (6, 3), (5, 2), (4, 1)])
def test_hma_groups_cover_every_parameter_once_and_are_contiguous(layers, k):
    model, _ = tiny(0, layers=layers)
    groups = fa.hma_groups(model, groups=k)
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert len(groups) == k
    assert "model.embed_tokens.weight" in groups[0]
    assert "model.norm.weight" in groups[-1] and "lm_head.weight" in groups[-1]
    blocks = [[int(n.split(".")[2]) for n in g if n.startswith("model.layers.")] for g in groups]
    seq = [b for g in blocks for b in g]
    assert seq == sorted(seq)  # contiguous, bottom to top
    sizes = [len(set(b)) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_more_groups_than_blocks_is_refused(tmp_path):
    """A group with no decoder block holds no parameter (or only the embeddings), yet its ratio counts toward the
    mean: 2 blocks split 5 ways gave group sizes [1, 0, 9, 0, 11]. Every entry point refuses it."""
    (pre, tok), (post, _) = tiny(0, layers=2), tiny(1, layers=2)
    assert [len(g) for g in fa.hma_groups(pre, groups=2)] == [10, 11]  # every group holds a block
    with pytest.raises(ValueError, match="5 layer groups needs at least 5 decoder blocks, but the model has 2"):
        fa.hma_groups(pre, groups=5)
    with pytest.raises(ValueError, match="at least 3 decoder blocks"):
        fa.hma(pre, post, weight_on_pre=0.5, groups=3)
    a, b = _save(pre, tok, tmp_path / "pre"), _save(post, tok, tmp_path / "post")
    with pytest.raises(ValueError, match="at least 5 decoder blocks"):
        streaming_merge(a, b, str(tmp_path / "m"), weight_on_pre=0.5, groups=5, progress=False)
    assert not os.path.exists(tmp_path / "m")


def test_tied_lm_head_is_owned_by_the_embedding_group():
    model, _ = tiny(0, tie_word_embeddings=True)
    other, _ = tiny(1, tie_word_embeddings=True)
    groups = fa.hma_groups(model, groups=3)
    assert "model.embed_tokens.weight" in groups[0]
    assert not any("lm_head" in n for g in groups for n in g)  # one tensor, listed once
    m = fa.hma(model, other, weight_on_pre=0.5, groups=3, ratios=[0.9, 0.5, 0.1])
    emb = m.model.embed_tokens.weight
    assert m.lm_head.weight.data_ptr() == emb.data_ptr()
    want = 0.9 * model.model.embed_tokens.weight + 0.1 * other.model.embed_tokens.weight
    torch.testing.assert_close(emb, want)


def test_hma_applies_each_groups_ratio(pair):
    pre, post, _ = pair
    ratios = [0.6, 0.3, 0.0]
    m = fa.hma(pre, post, weight_on_pre=0.3, groups=3, ratios=ratios)
    pre_p, post_p, out = dict(pre.named_parameters()), dict(post.named_parameters()), dict(m.named_parameters())
    for k, names in enumerate(fa.hma_groups(pre, 3)):
        for n in names:
            want = ratios[k] * pre_p[n].double() + (1 - ratios[k]) * post_p[n].double()
            torch.testing.assert_close(out[n].double(), want, rtol=0, atol=1e-6)
    plain = fa.hma(pre, post, weight_on_pre=0.3, groups=3)
    avg = fa.average_models(pre, post, weight_on_pre=0.3)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), avg.parameters()))


@pytest.mark.parametrize("ratios, match", [([0.5, 0.5], "one ratio per group"), ([0.9, 0.9, 0.9], "mean"),
                                           ([1.2, 0.0, 0.3], r"\[0, 1\]")])
def test_hma_bad_ratios(pair, ratios, match):
    with pytest.raises(ValueError, match=match):
        fa.hma(pair[0], pair[1], weight_on_pre=0.5, groups=3, ratios=ratios)


def test_projection_keeps_mean_and_bounds():
    for v, m in (([0.9, -0.4, 2.0], 0.5), ([0.1, 0.1, 0.1], 0.1), ([5.0, 0.0, 0.0, 0.0], 0.25)):
        a = project_ratios(v, m)
        assert abs(float(a.mean()) - m) < 1e-9 and float(a.min()) >= 0 and float(a.max()) <= 1
    assert project_ratios([0.2, 0.3, 0.4], 0.3).tolist() == pytest.approx([0.2, 0.3, 0.4])


ROWS = [{"prompt": "Q: hi\nA:", "chosen": " hello there", "rejected": " no"}, {"text": "the cat sat on the mat"},
        {"prompt": "Say yes:", "completion": " yes yes"}]


def test_ratio_gradient_equals_finite_differences():
    (pre, tok), (post, _) = tiny(0, dtype=torch.float64), tiny(1, dtype=torch.float64)
    ratios, eps = [0.2, 0.5, 0.35], 1e-3  # central differences; Llama's RMSNorm runs in fp32, so smaller steps hit its rounding
    _, grad = hma_ratio_grad(pre, post, ROWS, ratios, tokenizer=tok)
    for k in range(3):
        hi, lo = list(ratios), list(ratios)
        hi[k] += eps
        lo[k] -= eps
        fd = (hma_ratio_grad(pre, post, ROWS, hi, tokenizer=tok)[0] -
              hma_ratio_grad(pre, post, ROWS, lo, tokenizer=tok)[0]) / (2 * eps)
        assert grad[k].item() == pytest.approx(fd, rel=1e-3, abs=1e-6)


def test_fit_respects_constraints_and_lowers_the_loss(pair):
    pre, post, tok = pair
    ratios, hist = fa.fit_hma_ratios(pre, post, ROWS, weight_on_pre=0.4, groups=3, steps=15, lr=0.1, tokenizer=tok,
                                     progress=False, return_history=True)
    assert len(ratios) == 3 and all(0 <= r <= 1 for r in ratios)
    assert sum(ratios) / 3 == pytest.approx(0.4, abs=1e-9)
    start = hma_ratio_grad(pre, post, ROWS, [0.4] * 3, tokenizer=tok)[0]
    end = hma_ratio_grad(pre, post, ROWS, ratios, tokenizer=tok)[0]
    assert end < start and len(hist) == 15
    with pytest.raises(ValueError, match="tokenizer"):
        fa.fit_hma_ratios(pre, post, ROWS, weight_on_pre=0.4, steps=1)


def _save(model, tok, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("sharded", [False, True])
def test_streaming_merge_equals_in_memory_bit_for_bit(pair, tmp_path, sharded):
    pre, post, tok = pair
    kw = {"max_shard_size": "100KB"} if sharded else {}
    a, b = _save(pre, tok, tmp_path / "pre", **kw), _save(post, tok, tmp_path / "post", **kw)
    from safetensors.torch import load_file
    from fastalign.checkpoint import read_model_weights
    out = streaming_merge(a, b, str(tmp_path / "avg"), weight_on_pre=0.3, progress=False)
    want = fa.average_models(pre, post, weight_on_pre=0.3).state_dict()
    got = read_model_weights(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    if sharded:
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
        load_file(os.path.join(out, sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]))
    out = streaming_merge(a, b, str(tmp_path / "hma"), weight_on_pre=0.3, groups=3, ratios=[0.5, 0.3, 0.1],
                          progress=False)
    want = fa.hma(pre, post, weight_on_pre=0.3, groups=3, ratios=[0.5, 0.3, 0.1]).state_dict()
    got = read_model_weights(out)
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for name in ("trainer_state.json", "optimizer.pt", "rng_state.pt"):  # post as a trainer checkpoint holds them
        (tmp_path / "post" / name).write_text("{}")
    out = streaming_merge(a, b, str(tmp_path / "from_checkpoint"), weight_on_pre=0.3, progress=False)
    assert not {"trainer_state.json", "optimizer.pt", "rng_state.pt"} & set(os.listdir(out))
    assert all(torch.equal(p, want[n]) for n, p in reloaded.named_parameters())


def test_streaming_merge_refuses_mismatches(pair, tmp_path):
    pre, post, tok = pair
    a, b = _save(pre, tok, tmp_path / "pre"), _save(post, tok, tmp_path / "post")
    other, _ = tiny(2, layers=3)
    c = _save(other, tok, tmp_path / "other")
    with pytest.raises(AveragingError, match="model.layers.3"):
        streaming_merge(a, c, str(tmp_path / "x"), weight_on_pre=0.5, progress=False)
    half, _ = tiny(3, dtype=torch.bfloat16)
    d = _save(half, tok, tmp_path / "half")
    with pytest.raises(AveragingError, match="BF16|F32"):
        streaming_merge(a, d, str(tmp_path / "x"), weight_on_pre=0.5, progress=False)
    e = _save(post, tok, tmp_path / "tok")
    with open(os.path.join(e, "tokenizer.json")) as f:
        t = json.load(f)
    t["added_tokens"] = t["added_tokens"][:1]
    with open(os.path.join(e, "tokenizer.json"), "w") as f:
        json.dump(t, f)
    with pytest.raises(AveragingError, match="tokenizer"):
        streaming_merge(a, e, str(tmp_path / "x"), weight_on_pre=0.5, progress=False)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(AveragingError, match="merge_and_unload"):
        streaming_merge(a, str(lora), str(tmp_path / "x"), weight_on_pre=0.5, progress=False)
    streaming_merge(a, b, str(tmp_path / "done"), weight_on_pre=0.5, progress=False)
    with pytest.raises(FileExistsError, match="exists"):
        streaming_merge(a, b, str(tmp_path / "done"), weight_on_pre=0.5, progress=False)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # nothing half-written left behind


MEMORY_PROBE = r"""
import resource, sys, torch, transformers
from fastalign.merge import streaming_merge
import fastalign.averaging, safetensors.torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
streaming_merge(sys.argv[1], sys.argv[2], sys.argv[3], weight_on_pre=0.4, groups=3, ratios=[0.6, 0.4, 0.2],
                progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_streaming_merge_peak_memory_below_one_model(tmp_path):
    tok = byte_tokenizer()
    cfg = tiny_llama_config(len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=8)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(_save(transformers.LlamaForCausalLM(cfg), tok, tmp_path / f"m{seed}"))
    size = sum(os.path.getsize(os.path.join(models[0], f)) for f in os.listdir(models[0]) if f.endswith(".safetensors"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *models, str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.strip().splitlines()[-1])
    assert size > 20e6
    assert peak < 0.5 * size, f"peak extra memory {peak / 1e6:.1f} MB vs model {size / 1e6:.1f} MB"


def test_grid_parser():
    assert parse_grid("0,0.25,...,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_grid("0,0.1,...,1") == [round(i / 10, 10) for i in range(11)]
    assert parse_grid("0.2, 0.8") == [0.2, 0.8]
    assert parse_grid("0.2,0.4,...,0.8") == [0.2, 0.4, 0.6, 0.8]
    # the documented end is included or the grid is refused: 0,0.3,... never reaches 1 (it used to stop at 0.9)
    for text, match in (("0,0.3,...,1", "end 1 is not on the progression"), ("0.5,0.4,...,1", "start < second"),
                        ("0,0.5,2", r"each in \[0, 1\]"), ("", "expected numbers"), ("0,a", "expected numbers")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse_grid(text)


def test_cli_merge_and_tax(pair, tmp_path, capsys):
    pre, post, tok = pair
    a, b = _save(pre, tok, tmp_path / "pre"), _save(post, tok, tmp_path / "post")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"})
                               for i in range(4)) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"the cat number {i} sat."}) for i in range(4)) + "\n")
    assert cli_main(["merge", "--pre", a, "--post", b, "--weight-on-pre", "0.3", "--hma", "3", "--fit-data",
                     str(prefs), "--fit-steps", "2", "--out", str(tmp_path / "m")]) == 0
    assert "fitted HMA ratios" in capsys.readouterr().out
    assert cli_main(["tax", "--pre", a, "--post", b, "--align-data", str(prefs), "--general-data", str(text),
                     "--grid", "0,0.5,...,1", "--hma", "3", "--fit-steps", "2", "--output-dir",
                     str(tmp_path / "tax")]) == 0
    result = json.load(open(tmp_path / "tax" / "tax.json"))
    assert [r["weight_on_pre"] for r in result["rows"] if r["method"] == "average"] == [0.0, 0.5, 1.0]
    assert [r["weight_on_pre"] for r in result["rows"] if r["method"] == "hma"] == [0.5]
    assert result["pre"]["reward_accuracy"] == 0.5  # the pre model against itself: every pair ties
    assert os.path.isfile(tmp_path / "tax" / "tax.png")
    assert cli_main(["merge", "--pre", a, "--post", str(tmp_path / "nope"), "--weight-on-pre", "0.3", "--out",
                     str(tmp_path / "m2")]) == 2


def test_fit_moves_ratios_when_every_group_gradient_has_one_sign():
    """Adam on the raw ratio gradient steps every ratio alike when its components share a sign, and the mean
    projection then undoes the step: the fit must step along the gradient's mean-free part."""
    tok = byte_tokenizer()
    cfg = tiny_llama_config(len(tok), num_hidden_layers=4)
    torch.manual_seed(2)
    pre, post = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    rows = ROWS[:2]
    start, grad = hma_ratio_grad(pre, post, rows, [0.3] * 3, tokenizer=tok)
    assert bool((grad < 0).all()) or bool((grad > 0).all())  # the case this test is about
    ratios = fa.fit_hma_ratios(pre, post, rows, weight_on_pre=0.3, steps=20, tokenizer=tok, progress=False)
    assert max(abs(r - 0.3) for r in ratios) > 0.05
    assert hma_ratio_grad(pre, post, rows, ratios, tokenizer=tok)[0] < start


def test_ratio_fitting_still_imports_from_averaging_as_the_same_objects():
    from fastalign import averaging, hma_fit
    for name in averaging._MOVED_TO_HMA_FIT:
        assert getattr(averaging, name) is getattr(hma_fit, name), name
    with pytest.raises(AttributeError, match="has no attribute 'fit_nope'"):
        averaging.fit_nope


def test_tax_table_and_plot_show_the_reward_model_score_when_there_is_one(tmp_path):
    from fastalign.tax import markdown_table, plot_tax
    row = dict(method="average", weight_on_pre=0.5, reward_accuracy=0.75, reward_margin=0.2, nll=3.0, perplexity=20.1,
               token_accuracy=0.4)
    plain = markdown_table({"rows": [row]})
    assert "reward model score" not in plain and "| 0.750 | 0.200 | 3.0000 |" in plain
    scored = markdown_table({"rows": [dict(row, reward_model_score=1.234)]})
    assert "| reward accuracy | reward margin | reward model score | general NLL |" in scored
    assert "| 0.750 | 0.200 | 1.234 | 3.0000 |" in scored
    pytest.importorskip("matplotlib")
    assert os.path.isfile(plot_tax({"rows": [dict(row, reward_model_score=1.0)]}, str(tmp_path / "t.png"),
                                   y="reward_model_score"))


def test_tax_tokenizes_the_fit_data_once_whatever_the_grid(pair, monkeypatch):
    """alignment_tax with HMA fits ratios at every interior grid point on the same fit data: tokenized once, up
    front (where its errors surface before any evaluation), not again per fit."""
    from fastalign import data as fa_data
    from fastalign.tax import alignment_tax
    pre, post, tok = pair
    fit = [{"prompt": f"FIT{i}:", "chosen": " yes", "rejected": " no"} for i in range(2)]
    prefs = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(2)]
    text = [{"text": "the cat sat."}]
    real, fit_calls = fa_data.tokenize_pair, []

    def counting(tokenizer, prompt, answer, *args, **kw):
        if str(prompt).startswith("FIT"):
            fit_calls.append(prompt)
        return real(tokenizer, prompt, answer, *args, **kw)
    monkeypatch.setattr(fa_data, "tokenize_pair", counting)
    result = alignment_tax(pre, post, tok, prefs, text, grid=[0, 0.3, 0.6, 1], hma_groups=2, fit_data=fit,
                           fit_steps=1, progress=False)
    assert [r["weight_on_pre"] for r in result["rows"] if r["method"] == "hma"] == [0.3, 0.6]
    assert sorted(fit_calls) == ["FIT0:", "FIT1:"]
