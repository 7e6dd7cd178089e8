"""One call from whatever the user passed to tokenized examples: load -> validate -> tokenize -> drop rows
without signal, with every problem reported as a DataError naming file:line (or row) and field."""
from fastalign.data.errors import DataError
from fastalign.data.loading import load_rows
from fastalign.data.tokenize import tokenize_preference_rows, tokenize_sft_rows
from fastalign.data.validation import validate_rows


def prepare_examples(data, kind, tokenizer, config, name="train_dataset"):
    """Tokenized examples for a trainer. kind: "sft" or "preference" (DPO family and reward models).

    Reads max_length, max_prompt_length (resolved: None is half of max_length), max_completion_length and
    truncation_mode from ``config`` (TRL's names; a config without the last two means no completion cap and
    "keep_start").
    """
    row_kind = "sft" if kind == "sft" else "preference"
    try:
        rows = load_rows(data)
    except DataError as exc:
        more = ""
        partial = getattr(exc, "partial_rows", None)
        if partial:  # the lines that could be read are checked too: every problem of the file in one report
            try:
                validate_rows(partial, row_kind, name=name)
            except DataError as found:
                more = f"\n{found}"
        raise DataError(f"{name}: {exc}{more}") from None
    rows = validate_rows(rows, row_kind, name=name)
    tok = tokenize_sft_rows if kind == "sft" else tokenize_preference_rows
    max_prompt_length = getattr(config, "resolved_max_prompt_length", getattr(config, "max_prompt_length", None))
    return tok(rows, tokenizer, getattr(config, "max_length", None), max_prompt_length,
               max_completion_length=getattr(config, "max_completion_length", None),
               truncation_mode=getattr(config, "truncation_mode", None) or "keep_start", name=name)


def check_enough_rows(n_examples, per_device_batch_size, world_size=1, gradient_accumulation_steps=1,
                      name="train_dataset"):
    """DataError unless the examples fill one optimizer step (every process needs a full share of each
    global batch, and one step takes gradient_accumulation_steps of them)."""
    global_batch = per_device_batch_size * world_size
    if n_examples < global_batch:
        raise DataError(f"{name} has {n_examples} usable row(s), fewer than one global batch "
                        f"({per_device_batch_size} per device x {world_size} process(es) = {global_batch}); "
                        "add rows or lower per_device_train_batch_size")
    if n_examples < global_batch * gradient_accumulation_steps:
        raise DataError(f"{name} has {n_examples} usable row(s); one optimizer step needs "
                        f"gradient_accumulation_steps={gradient_accumulation_steps} global batches of {global_batch} "
                        f"= {global_batch * gradient_accumulation_steps}; add rows or lower either setting")
