"""The rows and the tiny DPO run the run-state tests use (test_run_state.py, and the child processes it starts,
which import this module rather than the test module): 16 training rows of the embedded preference data, 16 others
for a resume with different data, a 2-step DPOTrainer on the embedded tiny model that each test amends, and a
process that holds an output folder."""
import contextlib
import os
import signal

from fastalign.config import DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer
from fastalign.trainers import runlog

ROWS = load_rows(DEFAULT_PREFERENCES, "train")[:16]
OTHER_ROWS = load_rows(DEFAULT_PREFERENCES, "train")[16:32]


def dpo(out, rows=ROWS, **kw):
    """A DPOTrainer writing to `out`: 2 steps of 4 rows, lr 1e-3, beta 0.5; keyword arguments amend the config."""
    base = dict(output_dir=str(out), learning_rate=1e-3, beta=0.5, max_steps=2, per_device_train_batch_size=4,
                max_length=64, max_prompt_length=40, logging_steps=1, disable_tqdm=True, seed=1)
    base.update(kw)
    model, tok = default_model_and_tokenizer(seed=0)
    return DPOTrainer(model, tokenizer=tok, train_dataset=rows, config=DPOConfig(**base))


@contextlib.contextmanager
def held_by_another_process(folder):
    """A forked process holds ``folder``'s output lock for the block (yields its pid) and is SIGKILLed at its end,
    without releasing it, as a crashed run would."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            runlog.OutputDirLock(str(folder)).acquire()
            os.write(write, b"1")
            signal.pause()
        finally:
            os._exit(0)
    try:
        assert os.read(read, 1) == b"1"
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
