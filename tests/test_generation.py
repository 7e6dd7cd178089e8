"""Sampling (fastalign.generation), log-ratio score, reward scores and Best-of-N (fastalign.scoring) against naive
rewrites."""
import json

import pytest
import torch

import fastalign as fa
from fastalign.data import default_model_and_tokenizer

PROMPTS = ["hello", "a longer prompt here", "x", "abc:"]


@pytest.fixture(scope="module")
def lm():
    model, tok = default_model_and_tokenizer(seed=0)
    return model.eval(), tok


def _completions(rows):
    return [r["completion"] for r in rows]


def test_sample_deterministic_and_batch_invariant(lm):
    model, tok = lm
    prompts = PROMPTS[:3]
    kw = dict(n=2, max_new_tokens=5, temperature=1.0, seed=7, show_progress=False)
    batched = fa.sample(model, tok, prompts, batch_size=6, **kw)
    one_by_one = fa.sample(model, tok, prompts, batch_size=1, **kw)
    assert _completions(batched) == _completions(one_by_one)
    # a prompt's samples do not depend on the other prompts in the call
    alone = fa.sample(model, tok, prompts[1:2], batch_size=2, **kw)
    assert _completions(alone) == _completions(batched)[2:4]
    assert [(r["prompt"], r["sample_index"]) for r in batched[:3]] == [("hello", 0), ("hello", 1),
                                                                      ("a longer prompt here", 0)]
    other = fa.sample(model, tok, prompts, batch_size=6, **{**kw, "seed": 8})
    assert _completions(other) != _completions(batched)
    assert len(set(_completions(batched)[:2])) > 1  # different samples of one prompt


def test_sample_greedy_matches_argmax_decoding(lm):
    model, tok = lm
    rows = fa.sample(model, tok, ["hello"], n=2, max_new_tokens=5, temperature=0, show_progress=False)
    ids = [tok.bos_token_id] + tok("hello", add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in (tok.eos_token_id, tok.pad_token_id):
                break
            out.append(nxt)
    assert rows[0]["completion"] == rows[1]["completion"] == tok.decode(out)


def test_sample_writes_jsonl_and_uses_cache(lm, tmp_path, monkeypatch):
    model, tok = lm
    kw = dict(n=2, max_new_tokens=4, seed=1, show_progress=False, cache_dir=tmp_path / "cache")
    rows = fa.sample(model, tok, PROMPTS[:2], output=tmp_path / "s.jsonl", source="init", **kw)
    written = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert written == rows and {"prompt", "completion", "source"} <= set(rows[0]) and rows[0]["source"] == "init"

    def no_generate(*a, **k):
        raise AssertionError("generate called although the samples are cached")
    monkeypatch.setattr(model, "generate", no_generate)
    assert fa.sample(model, tok, PROMPTS[:2], source="init", **kw) == rows
    with pytest.raises(AssertionError, match="cached"):  # other settings: not the cached samples
        fa.sample(model, tok, PROMPTS[:2], source="init", **{**kw, "seed": 2})
    monkeypatch.undo()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # changed weights: a new fingerprint
    try:
        monkeypatch.setattr(model, "generate", no_generate)
        with pytest.raises(AssertionError, match="cached"):
            fa.sample(model, tok, PROMPTS[:2], source="init", **kw)
    finally:
        with torch.no_grad():
            model.lm_head.weight[0, 0] -= 1.0


def _naive_logp(model, tok, prompt, answer):
    """log pi(answer + EOS | BOS + prompt) from the model's full logits in float64."""
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a))


def test_log_ratio_score_matches_naive_logits(lm):
    model_a, tok = lm
    model_b, _ = default_model_and_tokenizer(seed=3)
    answers = ["world", "and a fairly long answer", "y", "q"]
    got = fa.log_ratio_score(model_a, model_b, tok, PROMPTS, answers, batch_size=3)
    assert got.dtype == torch.float32 and got.shape == (4,)
    want = torch.tensor([_naive_logp(model_a, tok, p, a) - _naive_logp(model_b, tok, p, a)
                         for p, a in zip(PROMPTS, answers)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-5)
    assert not got.requires_grad
    # the same model against itself: exactly zero
    assert torch.equal(fa.log_ratio_score(model_a, model_a, tok, PROMPTS, answers), torch.zeros(4))


def test_log_ratio_score_bad_inputs(lm):
    model, tok = lm
    from fastalign.data import tiny_llama_config
    import transformers
    other_vocab = transformers.LlamaForCausalLM(tiny_llama_config(len(tok) + 5))
    with pytest.raises(ValueError, match="vocabulary of 259 tokens and model_b of 264"):
        fa.log_ratio_score(model, other_vocab, tok, ["a"], ["b"])
    from fastalign.data import byte_tokenizer
    tok2 = byte_tokenizer()
    tok2.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        fa.log_ratio_score(model, model, (tok, tok2), ["a"], ["b"])
    with pytest.raises(ValueError, match="prompts is empty"):
        fa.log_ratio_score(model, model, tok, [], [])
    with pytest.raises(ValueError, match="2 prompts and 1 answers"):
        fa.log_ratio_score(model, model, tok, ["a", "b"], ["c"])


def test_sample_bad_inputs(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="prompts is empty"):
        fa.sample(model, tok, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        fa.sample(model, tok, ["a"], n=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        fa.sample(model, tok, ["a"], top_p=0.0, max_new_tokens=2)
    with pytest.raises(TypeError, match="list of prompts"):
        fa.sample(model, tok, "a single string", max_new_tokens=2)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        fa.best_of_n(model, lambda p, a: torch.zeros(len(a)), tok, ["a"], n=0)


def test_reward_scores_match_hf_logits():
    rm, tok = default_model_and_tokenizer("reward", seed=1)
    rm.eval()
    prompts, answers = ["ab", "a longer prompt"], ["c", "an answer of some length"]
    got = fa.reward_scores(rm, tok, prompts, answers, batch_size=2)
    for p, a, g in zip(prompts, answers, got):
        ids = [tok.bos_token_id] + tok(p + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            want = rm(torch.tensor([ids])).logits[0, 0]  # one unpadded row: HF reads the last token
        torch.testing.assert_close(g, want.float(), atol=1e-5, rtol=1e-5)


def test_best_of_n_picks_the_argmax(lm):
    model, tok = lm
    cands = [["a", "bb", "ccc"], ["dddd", "e", "ff"]]
    scorer = lambda prompts, answers: torch.tensor([float(len(a) % 3) for a in answers])  # noqa: E731
    res = fa.best_of_n(None, scorer, tok, ["p", "q"], n=3, candidates=cands, show_progress=False)
    assert res.scores.shape == (2, 3) and res.chosen == ["bb", "ff"] and res.chosen_index.tolist() == [1, 2]
    chosen, scores = res
    assert chosen == res["chosen"] == ["bb", "ff"] and scores is res.scores
    # sampled candidates, a reward model as the scorer: the chosen answer has the highest reward of its row
    rm, _ = default_model_and_tokenizer("reward", seed=2)
    res = fa.best_of_n(model, rm, tok, PROMPTS[:2], n=4, max_new_tokens=4, seed=3, score_batch_size=3,
                       show_progress=False)
    direct = fa.reward_scores(rm, tok, [p for p in PROMPTS[:2] for _ in range(4)],
                              [a for c in res.candidates for a in c]).view(2, 4)
    torch.testing.assert_close(res.scores, direct)
    assert res.chosen_index.tolist() == direct.argmax(-1).tolist()
    assert res.chosen == [c[k] for c, k in zip(res.candidates, direct.argmax(-1).tolist())]
    samples = fa.sample(model, tok, PROMPTS[:2], n=4, max_new_tokens=4, seed=3, show_progress=False)
    assert [a for c in res.candidates for a in c] == _completions(samples)
    with pytest.raises(ValueError, match="fewer than n=4"):
        fa.best_of_n(None, scorer, tok, ["p", "q"], n=4, candidates=cands)


def test_chat_template_used_for_sampling_and_scoring(lm):
    from fastalign.data import byte_tokenizer
    from fastalign.generation import prompt_ids
    model_a, _ = lm
    model_b, _ = default_model_and_tokenizer(seed=3)
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert prompt_ids(tok, "hi") == want  # no BOS: the template owns the framing
    rows = fa.sample(model_a, tok, ["hi"], n=2, max_new_tokens=3, show_progress=False)
    assert len(rows) == 2
    # the score reads the answer after the templated prompt: <|assistant|>answer\n</s>
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "yo"}], tokenize=False)
    answer_ids = tok(full[len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)):],
                     add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([want + answer_ids])

    def naive(model):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        return sum(float(logp[len(want) - 1 + k, t]) for k, t in enumerate(answer_ids))
    got = fa.log_ratio_score(model_a, model_b, tok, ["hi"], ["yo"])
    assert float(got[0]) == pytest.approx(naive(model_a) - naive(model_b), abs=2e-4)


def test_prompt_ids_lead_as_tokenize_pair_writes_it():
    # a GPT-2-style tokenizer has a bos_token but puts nothing before text: sampling's prompt must not invent one
    from tokenizers import processors
    from fastalign.data import byte_tokenizer, tokenize_pair
    from fastalign.generation import prompt_ids
    for adds_bos in (True, False):
        tok = byte_tokenizer()
        if not adds_bos:
            tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        ids, labels = tokenize_pair(tok, "Q: hi", " yo", 64, 32)
        want = [i for i, lab in zip(ids, labels) if lab == -100]
        assert prompt_ids(tok, "Q: hi") == want
        assert (want[0] == tok.bos_token_id) == adds_bos
