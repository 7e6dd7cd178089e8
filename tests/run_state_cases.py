"""The rows and the tiny DPO run the run-state tests use (test_run_state.py, and the child processes it starts,
which import this module rather than the test module): 16 training rows of the embedded preference data, 16 others
for a resume with different data, and a 2-step DPOTrainer on the embedded tiny model that each test amends."""
from fastalign.config import DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer

ROWS = load_rows(DEFAULT_PREFERENCES, "train")[:16]
OTHER_ROWS = load_rows(DEFAULT_PREFERENCES, "train")[16:32]


def dpo(out, rows=ROWS, **kw):
    """A DPOTrainer writing to `out`: 2 steps of 4 rows, lr 1e-3, beta 0.5; keyword arguments amend the config."""
    base = dict(output_dir=str(out), learning_rate=1e-3, beta=0.5, max_steps=2, per_device_train_batch_size=4,
                max_length=64, max_prompt_length=40, logging_steps=1, disable_tqdm=True, seed=1)
    base.update(kw)
    model, tok = default_model_and_tokenizer(seed=0)
    return DPOTrainer(model, tokenizer=tok, train_dataset=rows, config=DPOConfig(**base))
