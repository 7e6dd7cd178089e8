"""The rows, config and DPO trainer the trainer tests use (test_trainer.py, test_trainer_inputs.py): 32 training
and 12 evaluation rows of the embedded preference data, the config of a 3-step tiny run (beta 0.5 for DPO) that
each test amends with keyword arguments, and a DPOTrainer on the embedded tiny model built from them."""
from fastalign.config import DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer

ROWS = load_rows(DEFAULT_PREFERENCES, "train")[:32]
EVAL = load_rows(DEFAULT_PREFERENCES, "test")[:12]


def cfg(cls=DPOConfig, tmp=None, **kw):
    base = dict(output_dir=str(tmp or "runs/test"), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4,
                max_length=96, max_prompt_length=64, logging_steps=1, disable_tqdm=True, seed=1)
    if cls is DPOConfig:
        base["beta"] = 0.5
    base.update(kw)
    return cls(**base)


def dpo(tmp, rows=ROWS, model=None, **kw):
    m, tok = default_model_and_tokenizer(seed=0)
    return DPOTrainer(model or m, tokenizer=tok, train_dataset=rows, eval_dataset=EVAL, config=cfg(tmp=tmp, **kw))
