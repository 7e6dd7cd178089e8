"""The Hugging Face helper: trunk hidden states + lm_head give exactly the model's own log-probs."""
import pytest
import torch

import fastalign as fa
from fastalign.integrations import head_inputs, lm_head_config

transformers = pytest.importorskip("transformers")


def tiny_llama(vocab=97):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gemma2(vocab=89):
    cfg = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=5.0,
                                    attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma2])
def test_head_inputs_reproduce_model_logprobs(make):
    model = make()
    v = model.config.vocab_size
    ids = torch.randint(0, v, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        inp = head_inputs(model, ids, mask, labels)
    assert inp.hidden.shape == (3, 9, 32) and inp.labels.shape == (3, 9)
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, inp.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    want = torch.where(inp.labels != -100, want, 0).sum(-1)
    got, _ = fa.sequence_logprobs(inp.hidden, inp.weight, inp.labels, inp.bias, **inp.loss_kwargs())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_lm_head_config_reads_softcap_and_scales():
    assert lm_head_config(tiny_gemma2()) == (1.0, 5.0)
    assert lm_head_config(tiny_llama()) == (1.0, None)


def test_plain_training_loop_with_fused_dpo_learns():
    """The README's loop: a few steps of FusedDPOLoss on a tiny model raise the chosen-vs-rejected margin."""
    model = tiny_llama()
    model.train()
    ref = tiny_llama().eval()
    torch.manual_seed(1)
    chosen = torch.randint(0, 97, (4, 12))
    rejected = chosen.clone()
    rejected[:, 6:] = torch.randint(0, 97, (4, 6))
    ids = torch.cat([chosen, rejected])
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    loss_fn = fa.FusedDPOLoss(beta=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    margins = []
    for _ in range(8):
        inp = head_inputs(model, ids, labels=labels)
        with torch.no_grad():
            r = head_inputs(ref, ids, labels=labels)
        out = loss_fn(inp.hidden, inp.weight, inp.labels, ref_hidden=r.hidden, ref_weight=r.weight)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        margins.append(out.reward_margins.mean().item())
    assert margins[-1] > margins[0] + 0.5


def test_run_trunk_passes_use_cache_only_where_the_forward_takes_it():
    from fastalign.integrations.hf import run_trunk

    class Named(torch.nn.Module):  # most trunks: use_cache=False, no key/value cache built
        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return use_cache

    class Without(torch.nn.Module):  # XLM's trunk in transformers 4.x: no use_cache argument at all
        def forward(self, input_ids, attention_mask=None):
            return "called"

    class Wrapped(torch.nn.Module):  # a wrapper that forwards everything (FSDP, compiled modules)
        def forward(self, *args, **kwargs):
            return kwargs.get("use_cache", "absent")

    class Compiled(torch.nn.Module):  # as torch.compile's wrapper: forward(*args, **kwargs), the module in _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, *args, **kwargs):
            return self._orig_mod(*args, **kwargs)

    ids = torch.zeros(1, 3, dtype=torch.long)
    assert run_trunk(Named(), input_ids=ids) is False
    assert run_trunk(Without(), input_ids=ids, attention_mask=ids) == "called"
    assert run_trunk(Wrapped(), input_ids=ids) is False
    assert run_trunk(Compiled(Without()), input_ids=ids) == "called"  # asked about the module it wraps
    assert run_trunk(Compiled(Named()), input_ids=ids) is False
