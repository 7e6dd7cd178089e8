"""Any Hugging Face causal LM, or a clear refusal: each family with a head transform, from a tiny config.

For each family: the probe passes (fused log-probs == the model's own), the fused path's gradients equal
the model's own (float64; the transform and scale parameters included), and with the family's transform
deliberately dropped the probe refuses, naming the class and the size of the difference. Families that
this transformers version does not ship are skipped.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastalign as fa  # noqa: E402
from fastalign.errors import FastalignError, ModelCheckError, UnsupportedModelError  # noqa: E402
from fastalign.integrations import hf, probe  # noqa: E402
from fastalign.integrations.probe import check_fused_head  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ENCODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               is_decoder=True)
# family -> (config class, model class, tiny config, what fastalign must do for it). Values are chosen so the
# transform moves the log-probs of a random tiny model visibly (small soft caps, multipliers far from 1).
FAMILIES = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", SMALL, "nothing"),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", dict(SMALL, logits_scaling=4.0), "config"),
    "HyperCLOVAX": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(SMALL, logits_scaling=4.0, head_dim=8),
                    "config"),
    "FalconH1": ("FalconH1Config", "FalconH1ForCausalLM",
                 dict(SMALL, lm_head_multiplier=5.0, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
                      mamba_chunk_size=8, mamba_expand=1), "config"),
    "RecurrentGemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                       dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, lru_width=32, attention_window_size=16,
                            logits_soft_cap=0.2), "config"),
    "xLSTM": ("xLSTMConfig", "xLSTMForCausalLM",
              dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, output_logit_soft_cap=0.2,
                   chunk_size=4, mode="train", autocast_kernel_dtype="float32"), "config"),
    "Dory": ("DoryConfig", "DoryForCausalLM",
             dict(SMALL, head_dim=8, num_hidden_layers=3, n_input_layers=1, n_output_layers=1, n_recurrent_layers=1),
             "scale"),
    "Bert": ("BertConfig", "BertLMHeadModel", ENCODER, "transform"),
    "Roberta": ("RobertaConfig", "RobertaForCausalLM", ENCODER, "transform"),
    "Electra": ("ElectraConfig", "ElectraForCausalLM", dict(ENCODER, embedding_size=16), "transform"),
    "RemBert": ("RemBertConfig", "RemBertForCausalLM",
                dict(ENCODER, input_embedding_size=16, output_embedding_size=24), "transform"),
    "XLM": ("XLMConfig", "XLMWithLMHeadModel", dict(vocab_size=64, emb_dim=32, n_layers=2, n_heads=4, causal=True),
            "nothing"),
}


def build(family, dtype=torch.float32):
    cfg_name, model_name, kwargs, _ = FAMILIES[family]
    if not hasattr(transformers, cfg_name) or not hasattr(transformers, model_name):
        pytest.skip(f"{model_name} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kwargs)).to(dtype)
    if family == "Dory":  # the learned per-token scale starts constant: make it vary so dropping it shows
        with torch.no_grad():
            model.lm_head.logit_scale.uniform_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_probe_accepts_family(family):
    result = check_fused_head(build(family))
    assert result.max_abs_diff < 1e-5 and result.model_class == FAMILIES[family][1]


def break_support(monkeypatch, kind):
    if kind == "config":
        monkeypatch.setattr(probe, "lm_head_config", lambda model: (1.0, None))
    elif kind == "scale":
        monkeypatch.setattr(hf, "_per_token_scale", lambda head, vocab: None)
    elif kind == "transform":
        monkeypatch.setattr(hf, "head_transform", lambda model: None)


@pytest.mark.parametrize("family", [f for f, v in FAMILIES.items() if v[3] != "nothing"])
def test_probe_refuses_family_with_its_transform_dropped(family, monkeypatch):
    model = build(family)
    break_support(monkeypatch, FAMILIES[family][3])
    with pytest.raises(UnsupportedModelError, match=FAMILIES[family][1]) as info:
        check_fused_head(model)
    if isinstance(info.value, ModelCheckError):
        diff = float(str(info.value).split("by up to ")[1].split(" ")[0])
        assert diff > 1e-2


def fused_sum(model, ids):
    inp = hf.head_inputs(model, ids, labels=ids)
    logp = fa.linear_logprobs(inp.hidden.reshape(-1, inp.hidden.shape[-1]), inp.weight, inp.labels.reshape(-1),
                              inp.bias, **inp.loss_kwargs())
    return (logp * torch.linspace(0.5, 1.5, logp.numel(), dtype=logp.dtype)).sum()


def model_sum(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).reshape(-1)
    return (logp * torch.linspace(0.5, 1.5, logp.numel(), dtype=logp.dtype)).sum()


@pytest.mark.parametrize("family", ["Dory", "Bert", "Roberta", "Electra", "RemBert"])
def test_fused_gradients_equal_model_gradients(family):
    """float64: every parameter's gradient (transform and per-token scale included) equals the model's own
    (Dory's head casts its logits to float32, hence 1e-6 relative to each tensor's largest entry)."""
    model = build(family, torch.float64)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = []
    for f in (fused_sum, model_sum):
        model.zero_grad()
        f(model, ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    fused, own = grads
    assert set(fused) == set(own)
    special = [n for n in own if "logit_scale" in n or "transform" in n or "generator_predictions" in n
               or "lm_head.dense" in n or "lm_head.layer_norm" in n or "predictions.dense" in n
               or "predictions.LayerNorm" in n]
    if FAMILIES[family][3] in ("scale", "transform"):
        assert special and all(own[n].abs().sum() > 0 for n in special)
    for n in own:
        err = float((fused[n] - own[n]).abs().max())
        assert err <= 1e-6 * float(own[n].abs().max()) + 1e-12, f"{family}: gradient of {n} off by {err:.3g}"


def test_xlm_adaptive_softmax_is_refused():
    if not hasattr(transformers, "XLMWithLMHeadModel"):
        pytest.skip("no XLM in this transformers")
    cfg = transformers.XLMConfig(vocab_size=64, emb_dim=32, n_layers=1, n_heads=4, causal=True, asm=True,
                                 asm_cutoffs=[8, 16], asm_div_value=2.0)
    with pytest.raises(UnsupportedModelError, match="XLMWithLMHeadModel uses an adaptive softmax"):
        check_fused_head(transformers.XLMWithLMHeadModel(cfg))


class ShiftedLlama(transformers.LlamaForCausalLM):
    """A model whose forward changes its logits in a way no config field announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0 + torch.linspace(0, 1, out.logits.shape[-1])
        return out


def test_unknown_transform_is_refused_with_class_and_size():
    torch.manual_seed(0)
    model = ShiftedLlama(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ModelCheckError, match=r"ShiftedLlama: the fused log-probs differ .* by up to [0-9.]+") as info:
        check_fused_head(model)
    assert isinstance(info.value, FastalignError) and isinstance(info.value, ValueError)


def test_probe_restores_training_mode_and_leaves_no_grad():
    model = build("Llama").train()
    check_fused_head(model)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_probe_reports_an_error_inside_the_models_forward_once_and_names_it():
    model = build("Llama")
    calls = []

    def forward(input_ids, attention_mask=None, use_cache=None, **kwargs):
        calls.append(sorted(k for k, v in dict(attention_mask=attention_mask, use_cache=use_cache).items()
                            if v is not None))
        raise TypeError("unsupported operand inside the model")

    model.forward = forward
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM: the model's own forward failed on 2 x 8 "
                                                    r"random tokens \(TypeError: unsupported operand inside"):
        check_fused_head(model)
    assert calls == [["attention_mask", "use_cache"]]  # not retried without its arguments


def test_trainer_refuses_unsupported_model_and_check_model_opts_out(tmp_path):
    from fastalign.config import SFTConfig
    from fastalign.data import byte_tokenizer
    from fastalign.trainers import SFTTrainer
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = ShiftedLlama(transformers.LlamaConfig(**dict(SMALL, vocab_size=len(tok))))
    rows = [{"prompt": "hi", "completion": " there"}] * 4
    cfg = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=16, max_prompt_length=8,
               report_to="none", disable_tqdm=True, max_steps=1)
    with pytest.raises(ModelCheckError, match="ShiftedLlama"):
        SFTTrainer(model, tokenizer=tok, train_dataset=rows, config=SFTConfig(**cfg))
    trainer = SFTTrainer(model, tokenizer=tok, train_dataset=rows, config=SFTConfig(**cfg, check_model=False))
    assert trainer.model_check is None
