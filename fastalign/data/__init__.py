"""Embedded defaults (data, tokenizer, tiny model config) and the data path: load (loading.py), validate
(validation.py), tokenize (tokenize.py), collate (collate.py); prepare.py chains them for the trainers.
Every name is importable from ``fastalign.data``.

Everything here works offline: nothing is downloaded.
"""
import json
import os

import torch

from fastalign.data.collate import Batch, collate_preference, collate_sequences, collate_sft  # noqa: F401
from fastalign.data.errors import DataError  # noqa: F401
from fastalign.data.loading import Rows, load_rows, locations  # noqa: F401
from fastalign.data.prepare import check_enough_rows, prepare_examples  # noqa: F401
from fastalign.data.tokenize import (IGNORE_INDEX, TRUNCATION_MODES, leading_special_ids, render,  # noqa: F401
                                     row_positions, tokenize_pair, tokenize_pairs_with_positions,
                                     tokenize_preference_rows, tokenize_sft_rows, truncate,
                                     with_distinct_locations)
from fastalign.data.validation import extract_prompt, is_messages, is_nonempty, validate_rows  # noqa: F401

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PREFERENCES = os.path.join(DATA_DIR, "personas.jsonl")
TINY_LLAMA_CONFIG = os.path.join(DATA_DIR, "tiny_llama.json")


# ---- embedded defaults ------------------------------------------------------------------------------

def byte_tokenizer():
    """An offline byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) as a Hugging Face fast tokenizer,
    so it saves with save_pretrained and loads back with AutoTokenizer. Like Llama's, it puts <s> (BOS)
    before text when asked for special tokens (``tok(text)``), and nothing with add_special_tokens=False."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])  # ids 256, 257, 258
    # BOS through the tokenizer's own post-processor, as Llama's tokenizer.json has it: transformers 4.x's generic
    # fast tokenizer ignores add_bos_token (4.40 then tokenized every row without <s>)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", bos)])
    # model_input_names: no token_type_ids (4.x's generic fast tokenizer returns them; Llama's forward takes none).
    # No clean-up of spaces in decode: bytes decode to exactly the text (4.x cleaned up by default)
    # add_bos_token=True as well: 5.x rebuilds the post-processor from add_bos_token / add_eos_token whenever either
    # is set (e.g. add_eos_token for SFT), and without it would drop the BOS then
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   add_bos_token=True, model_input_names=["input_ids", "attention_mask"],
                                   clean_up_tokenization_spaces=False)


def tiny_llama_config(vocab_size, **overrides):
    """The embedded tiny Llama-style config (a few hundred thousand parameters)."""
    from transformers import LlamaConfig
    with open(TINY_LLAMA_CONFIG) as f:
        cfg = json.load(f)
    cfg.update(vocab_size=vocab_size, **overrides)
    return LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})


def default_model_and_tokenizer(kind="causal-lm", seed=0):
    """Tiny Llama (fresh weights from the embedded config) and the byte tokenizer."""
    import transformers
    tok = byte_tokenizer()
    cfg = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if kind == "causal-lm":
        return transformers.LlamaForCausalLM(cfg), tok
    if kind == "reward":
        cfg.num_labels = 1
        return transformers.LlamaForSequenceClassification(cfg), tok
    raise ValueError(f"unknown model kind {kind!r}; expected 'causal-lm' or 'reward'")
