"""The rows and config the shared loop's tests use (test_loop.py, test_loop_trl_api.py): 16 training and 8
evaluation rows of the embedded preference data, and the config of a 3-step tiny run that each test amends with
keyword arguments."""
from fastalign.config import DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, load_rows

ROWS = load_rows(DEFAULT_PREFERENCES, "train")[:16]
EVAL = load_rows(DEFAULT_PREFERENCES, "test")[:8]


def cfg(cls=DPOConfig, tmp=None, **kw):
    base = dict(output_dir=str(tmp or "runs/test"), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4,
                max_length=96, max_prompt_length=64, logging_steps=1, disable_tqdm=True, seed=1)
    base.update(kw)
    return cls(**base)
