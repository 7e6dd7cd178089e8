"""Tokenization: exact token ids for chat-templated rows (ChatML and Llama-3 templates written here, offline),
the BOS/EOS convention for plain text, truncation (max_prompt_length, max_completion_length, max_length with
truncation_mode) and pairs dropped for carrying no signal."""
from types import SimpleNamespace

import pytest

from fastalign.config import DPOConfig, RewardConfig, SFTConfig
from fastalign.data import DataError, byte_tokenizer, prepare_examples, tiny_llama_config, tokenize_preference_rows
from fastalign.trainer import DPOTrainer, RewardTrainer, SFTTrainer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
USER = [{"role": "user", "content": "Hi"}]
YES, NO = [{"role": "assistant", "content": "Yes"}], [{"role": "assistant", "content": "No"}]


def _tokenizer(template, specials, bos=None, eos=None):
    tok = byte_tokenizer()
    tok.add_tokens(specials, special_tokens=True)
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


def _bytes(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _examples_of_every_trainer(tok, tmp_path):
    """Tokenized examples as the DPO, reward and SFT trainers build them."""
    import transformers
    cfg = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id)
    common = dict(per_device_train_batch_size=1, max_length=64, max_prompt_length=32, disable_tqdm=True)
    pair = [{"prompt": USER, "chosen": YES, "rejected": NO}]
    implicit = [{"chosen": USER + YES, "rejected": USER + NO}]
    dpo = DPOTrainer(transformers.LlamaForCausalLM(cfg), tokenizer=tok, train_dataset=pair,
                     config=DPOConfig(output_dir=str(tmp_path / "d"), **common)).train_examples[0]
    dpo_implicit = prepare_examples(implicit, "preference", tok, DPOConfig(output_dir=str(tmp_path), **common))[0]
    cfg.num_labels = 1
    rm = RewardTrainer(transformers.LlamaForSequenceClassification(cfg), tokenizer=tok, train_dataset=pair,
                       config=RewardConfig(output_dir=str(tmp_path / "r"), **common)).train_examples[0]
    sft = SFTTrainer(transformers.LlamaForCausalLM(tiny_llama_config(len(tok))), tokenizer=tok,
                     train_dataset=[{"messages": USER + YES}],
                     config=SFTConfig(output_dir=str(tmp_path / "s"), **common)).train_examples[0]
    return dpo, dpo_implicit, rm, sft


def _check(examples, prompt, chosen, rejected):
    dpo, dpo_implicit, rm, sft = examples
    for ex in (dpo, dpo_implicit, rm):
        assert ex["chosen_ids"] == prompt + chosen
        assert ex["chosen_labels"] == [-100] * len(prompt) + chosen
        assert ex["rejected_ids"] == prompt + rejected
        assert ex["rejected_labels"] == [-100] * len(prompt) + rejected
    assert sft["ids"] == prompt + chosen and sft["labels"] == [-100] * len(prompt) + chosen


def test_chatml_template_closes_the_turn_once(tmp_path):
    tok = _tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    b = lambda s: _bytes(tok, s)  # noqa: E731
    prompt = [start] + b("user\nHi") + [end] + b("\n") + [start] + b("assistant\n")
    examples = _examples_of_every_trainer(tok, tmp_path)
    # not <|im_end|>\n<|im_end|>: the template's own end of turn, nothing appended
    _check(examples, prompt, b("Yes") + [end] + b("\n"), b("No") + [end] + b("\n"))


@pytest.mark.parametrize("eos", ["<|eot_id|>", "<|end_of_text|>"])
def test_llama3_template_has_one_bos_and_one_end_of_turn(tmp_path, eos):
    tok = _tokenizer(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                              "<|end_of_text|>"], bos="<|begin_of_text|>", eos=eos)
    bot, sh, eh, eot = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                  "<|eot_id|>"])
    b = lambda s: _bytes(tok, s)  # noqa: E731
    prompt = [bot, sh] + b("user") + [eh] + b("\n\nHi") + [eot, sh] + b("assistant") + [eh] + b("\n\n")
    # with either EOS (instruct: <|eot_id|>, base: <|end_of_text|>) the turn ends with <|eot_id|> alone
    _check(_examples_of_every_trainer(tok, tmp_path), prompt, b("Yes") + [eot], b("No") + [eot])


def test_template_that_leaves_the_turn_open_gets_eos():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = tokenize_preference_rows([{"prompt": USER, "chosen": YES, "rejected": NO}], tok, 64, 32)[0]
    assert ex["chosen_ids"] == _bytes(tok, "<user>Hi<assistant>Yes") + [tok.eos_token_id]


def test_plain_text_bos_is_what_the_tokenizer_adds_and_eos_is_not_doubled():
    tok = byte_tokenizer()  # adds <s> before text, as Llama's tokenizers do
    rows = [{"prompt": "Q:", "chosen": " yes", "rejected": " no</s>"}]
    ex = tokenize_preference_rows(rows, tok, 64, 32)[0]
    assert ex["chosen_ids"] == [tok.bos_token_id] + _bytes(tok, "Q: yes") + [tok.eos_token_id]
    assert ex["rejected_ids"] == [tok.bos_token_id] + _bytes(tok, "Q: no") + [tok.eos_token_id]
    # a GPT-2/Qwen-style tokenizer: no BOS is invented. Set on the tokenizers backend: transformers 4.x's generic
    # fast tokenizer ignores an add_bos_token attribute (5.x rebuilds its post-processor from it)
    from tokenizers import processors
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    assert tok("Q:")["input_ids"] == _bytes(tok, "Q:")
    ex = tokenize_preference_rows(rows, tok, 64, 32)[0]
    assert ex["chosen_ids"] == _bytes(tok, "Q: yes") + [tok.eos_token_id]


# ---- truncation -----------------------------------------------------------------------------------------
# Byte tokenizer: one token per character, <s> before the prompt, </s> after each answer.
ROW = {"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "zyx"}


def _cut(mode, max_length, max_prompt_length=None, max_completion_length=None, rows=(ROW,)):
    tok = byte_tokenizer()
    ex = tokenize_preference_rows(list(rows), tok, max_length, max_prompt_length, max_completion_length,
                                  truncation_mode=mode)[0]
    n_prompt = ex["chosen_labels"].count(-100)
    text = lambda ids: tok.decode(ids)  # noqa: E731
    return (text(ex["chosen_ids"][:n_prompt]), text(ex["chosen_ids"][n_prompt:]), text(ex["rejected_ids"][n_prompt:]))


def test_truncation_modes():
    # 11 prompt tokens (<s> + 10), answers of 11 and 4 tokens: 22 > max_length 16
    assert _cut("keep_start", 16, 12) == ("<s>abcdefghij", "01234", "zyx</s>")
    assert _cut("keep_end", 16, 12) == ("fghij", "0123456789</s>", "zyx</s>")
    # max_prompt_length keeps the prompt's end (TRL's rule: a BOS goes with the cut start); one shared prompt
    assert _cut("keep_start", 64, 6) == ("efghij", "0123456789</s>", "zyx</s>")
    assert _cut("keep_start", 64, 6, max_completion_length=3) == ("efghij", "012", "zyx")
    # an answer longer than max_length alone: keep_end keeps its end (the last 8 tokens)
    assert _cut("keep_end", 8, 4) == ("", "3456789</s>", "zyx</s>")


def test_truncate_can_keep_the_bos():
    from fastalign.data import truncate
    p, (a,) = truncate([1, 2, 3, 4, 5], [[7, 8, 9]], max_length=6, max_prompt_length=4, truncation_mode="keep_end",
                       n_lead=1)
    assert p == [1, 4, 5] and a == [7, 8, 9]
    assert truncate([1, 2, 3, 4, 5], [[7, 8, 9]], max_length=6, max_prompt_length=4, n_lead=1)[0] == [1, 3, 4, 5]


def test_config_fields_are_read_by_name():
    cfg = SimpleNamespace(max_length=16, max_prompt_length=12, max_completion_length=None, truncation_mode="keep_end")
    ex = prepare_examples([ROW], "preference", byte_tokenizer(), cfg)[0]
    assert ex["chosen_ids"] == _bytes(byte_tokenizer(), "fghij0123456789") + [byte_tokenizer().eos_token_id]
    old_config = SimpleNamespace(max_length=16, max_prompt_length=12)  # without the TRL fields: keep_start
    assert len(prepare_examples([ROW], "preference", byte_tokenizer(), old_config)[0]["rejected_ids"]) == 15
    with pytest.raises(ValueError, match="truncation_mode must be one of keep_start, keep_end, got 'left'"):
        prepare_examples([ROW], "preference", byte_tokenizer(), SimpleNamespace(**{**vars(cfg), "truncation_mode": "left"}))


def test_pairs_without_signal_after_truncation_are_dropped_and_counted():
    rows = [ROW, {"prompt": "p", "chosen": "same start A", "rejected": "same start B"}, ROW]
    cfg = SimpleNamespace(max_length=64, max_prompt_length=32, max_completion_length=5, truncation_mode="keep_start")
    with pytest.warns(UserWarning, match=r"train_dataset: dropped 1 of 3 pair\(s\): chosen and rejected are identical "
                                         r"after truncation \(no preference signal\) \(max_length=64, "
                                         r"max_prompt_length=32, max_completion_length=5, truncation_mode=keep_start\); "
                                         r"row 1"):
        examples = prepare_examples(rows, "preference", byte_tokenizer(), cfg)
    assert [e["index"] for e in examples] == [0, 1] and [e["row"] for e in examples] == ["row 0", "row 2"]
    # a prompt that fills max_length leaves no answer token (no max_prompt_length to cap it)
    long = SimpleNamespace(max_length=8, max_prompt_length=None)
    with pytest.raises(DataError, match=r"no usable pair\(s\) left: all 1 were dropped \(1: the prompt fills "
                                        r"max_length, leaving no answer token\)"):
        with pytest.warns(UserWarning, match="dropped 1 of 1"):
            prepare_examples([ROW], "preference", byte_tokenizer(), long)


def test_byte_tokenizer_adds_bos_through_its_post_processor_and_returns_no_token_type_ids(tmp_path):
    # found under transformers 4.40: its generic fast tokenizer ignored add_bos_token=True, so no row had <s>
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tok = byte_tokenizer()
    assert tok.backend_tokenizer.encode("ab").ids == [tok.bos_token_id, *_bytes(tok, "ab")]
    assert tok("ab") == {"input_ids": [tok.bos_token_id, *_bytes(tok, "ab")], "attention_mask": [1, 1, 1]}
    tok.save_pretrained(tmp_path)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("ab").ids[0] == tok.bos_token_id
    assert AutoTokenizer.from_pretrained(tmp_path)("ab")["input_ids"] == tok("ab")["input_ids"]
    text = "a , b . c 's"  # bytes decode to exactly the text: no clean-up of spaces (4.x's default)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    tok.add_eos_token = True  # 5.x rebuilds the post-processor from the add_*_token flags: the BOS must stay
    assert tok("ab")["input_ids"][0] == tok.bos_token_id


def test_max_prompt_length_defaults_to_half_of_max_length_and_cut_prompts_are_counted():
    """TRL 1.x has no max_prompt_length: a TRL config with a short max_length must be accepted (it was refused when
    the default was a fixed 256), and the prompts the limit cuts are said, with a count."""
    for cls, n in ((DPOConfig, 256), (SFTConfig, 64), (RewardConfig, 128)):
        cfg = cls(max_length=n)
        assert cfg.max_prompt_length is None and cfg.resolved_max_prompt_length == n // 2
    assert DPOConfig(max_length=16, max_prompt_length=4).resolved_max_prompt_length == 4
    long_prompt = dict(ROW, prompt="p" * 40)
    with pytest.warns(UserWarning, match=r"train_dataset: cut the prompt of 1 of 2 pair\(s\) to its last 16 tokens "
                                         r"\(max_prompt_length=16; by default half of max_length"):
        examples = prepare_examples([long_prompt, ROW], "preference", byte_tokenizer(), DPOConfig(max_length=32))
    assert examples[0]["chosen_ids"][:16] == _bytes(byte_tokenizer(), "p" * 16)


def test_data_warnings_point_at_the_users_line():
    import warnings
    rows = [ROW, {"prompt": "p", "chosen": "same start A", "rejected": "same start B"}]
    cfg = SimpleNamespace(max_length=64, max_prompt_length=4, max_completion_length=5, truncation_mode="keep_start")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_examples(rows, "preference", byte_tokenizer(), cfg)
    assert len(caught) == 2 and all(w.filename == __file__ for w in caught)  # not fastalign/data/*.py
