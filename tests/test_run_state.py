"""One run per output folder, resume that cannot pick the wrong run, crash-safe and disk-full-safe saves, safe
loading, save_strategy, and metrics files per run segment (tiny model, a few steps each)."""
import errno
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fastalign import checkpoint as ckpt
from fastalign.checkpoint import DamagedCheckpointError, NoSpaceLeftError, RunStateError, UnsafeCheckpointError
from fastalign.config import ConfigError, DPOConfig
from fastalign.trainers import runlog
from fastalign.trainers.state import ResumeMismatchError
from tests.run_state_cases import OTHER_ROWS, ROWS, dpo, held_by_another_process


def _rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# ---- one run per output folder ---------------------------------------------------------------------------------
def test_second_run_fails_at_once_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    with held_by_another_process(tmp_path) as pid:  # until it is killed
        t = dpo(tmp_path)
        with pytest.raises(RunStateError, match=rf"in use by another run \(pid {pid} on host "
                                                rf"{socket.gethostname()}"):
            t.train()
        assert not os.path.exists(tmp_path / "metrics.jsonl")  # it stopped before writing anything
    # the holder died without releasing: its record stays, the kernel dropped the flock -> taken over
    assert json.loads((tmp_path / runlog.LOCK_FILE).read_text())["pid"] == pid
    with pytest.warns(UserWarning, match=rf"taking over the stale lock .* \(pid {pid} "):
        t.train()
    assert t.global_step == 2 and not os.path.exists(tmp_path / runlog.LOCK_FILE)  # released at the end


def test_a_fresh_run_refuses_a_used_folder_unless_resumed_or_overwritten(tmp_path):
    a = dpo(tmp_path, lr_scheduler_type="constant")
    a.train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]  # the default saves the final state
    with pytest.raises(RunStateError, match=r"holds the output of another run \(checkpoint-2, metrics.jsonl\).*"
                                            r"--resume.*--overwrite-output-dir"):
        dpo(tmp_path, lr_scheduler_type="constant").train()
    # resume "latest": the run goes on (a longer run, allowed with a constant learning rate)
    b = dpo(tmp_path, lr_scheduler_type="constant", max_steps=3)
    b.train(resume_from_checkpoint="latest")
    assert b.global_step == 3 and b._run_id == _rows(tmp_path / "metrics.jsonl")[0]["run_id"]
    assert [r["step"] for r in _rows(tmp_path / "metrics-1.jsonl")] == [3]
    # overwrite: the old run's checkpoints and metrics go, the new run starts at step 0
    with pytest.warns(UserWarning, match="overwrite_output_dir: deleted checkpoint-2, checkpoint-3"):
        c = dpo(tmp_path, overwrite_output_dir=True)
        c.train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not os.path.exists(tmp_path / "metrics-1.jsonl")
    assert {r["run_id"] for r in _rows(tmp_path / "metrics.jsonl")} == {c._run_id} != {b._run_id}


def test_resume_from_an_earlier_checkpoint_refuses_the_later_ones_of_the_abandoned_run(tmp_path):
    dpo(tmp_path, max_steps=2, save_steps=1).train()
    with pytest.raises(RunStateError, match=r"holds later checkpoints of this same run \(checkpoint-2\) than .*"
                                            r"checkpoint-1: resuming from it would abandon them"):
        dpo(tmp_path, max_steps=2, save_steps=1).train(str(tmp_path / "checkpoint-1"))
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    first_two = pathlib.Path(tmp_path / "checkpoint-2" / "trainer_state.json").read_text()
    with pytest.warns(UserWarning, match="overwrite_output_dir: deleted checkpoint-2 from"):
        dpo(tmp_path, max_steps=2, save_steps=1, overwrite_output_dir=True).train(str(tmp_path / "checkpoint-1"))
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1, 2]  # checkpoint-1 kept, 2 written anew
    assert pathlib.Path(tmp_path / "checkpoint-2" / "trainer_state.json").read_text() != first_two


def test_resume_refuses_changed_options_and_data_naming_each_and_allows_free_ones(tmp_path):
    dpo(tmp_path / "a", max_steps=2).train()
    start = str(tmp_path / "a" / "checkpoint-2")
    changed = dpo(tmp_path / "b", rows=OTHER_ROWS, max_steps=2, learning_rate=2e-3, beta=0.3)
    with pytest.raises(ResumeMismatchError) as err:
        changed.train(start)
    msg = str(err.value)
    for expected in ("learning_rate: saved 0.001, now 0.002", "beta: saved 0.5, now 0.3",
                     "training data: saved 16 rows with fingerprint", "--allow-config-change"):
        assert expected in msg
    more_steps = dpo(tmp_path / "c", max_steps=4)  # the linear schedule depends on the total
    with pytest.raises(ResumeMismatchError, match="max_steps: saved 2, now 4"):
        more_steps.train(start)
    # with allow_config_change the differences are logged and the run goes on
    allowed = dpo(tmp_path / "d", max_steps=4, learning_rate=2e-3, allow_config_change=True)
    with pytest.warns(UserWarning, match=r"changed configuration.*\n  learning_rate: saved 0.001, now 0.002"):
        allowed.train(start)
    assert allowed.global_step == 4
    # logging, output, evaluation and saving options may change freely
    free = dpo(tmp_path / "e", max_steps=2, logging_steps=5, eval_steps=7, save_strategy="no", report_to="none",
               disable_tqdm=False, per_device_eval_batch_size=3, grad_in_forward="off")
    with pytest.warns(UserWarning, match="resumed at step 2, which already reaches this run's 2 steps: nothing left"):
        free.train(start)  # a finished run resumed says so instead of training 0 steps in silence
    assert free.global_step == 2


# ---- crash safety of saves -------------------------------------------------------------------------------------
SAVE_STEPS = ("payload-written", "fsynced", "old-set-aside", "new-in-place", "old-removed", "prune-set-aside",
              "pruned")


def _payload(tag):
    def write(tmp):
        with open(os.path.join(tmp, "payload.txt"), "w") as f:
            f.write(tag * 1000)
    return write


def _complete(path):
    state = ckpt.read_state(path)
    return pathlib.Path(path, "payload.txt").read_text() == state["tag"] * 1000, state["tag"]


@pytest.mark.parametrize("kill_at", SAVE_STEPS)
def test_a_kill_at_any_step_of_a_save_loses_no_checkpoint(tmp_path, kill_at):
    """A child process replaces checkpoint-2 and prunes checkpoint-1; SIGKILL arrives at one step of it (through
    the save hook). After recovery the newest checkpoint is complete (old or new), nothing is left over."""
    out = str(tmp_path)
    for step, tag in ((1, "a"), (2, "b")):
        ckpt.save_checkpoint(out, step, _payload(tag), {"global_step": step, "tag": tag})
    pid = os.fork()
    if pid == 0:
        try:
            def hook(step, path):
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            ckpt.SAVE_STEP_HOOK = hook
            ckpt.save_checkpoint(out, 2, _payload("c"), {"global_step": 2, "tag": "c"})
            ckpt.prune_checkpoints(out, 1)
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ckpt.recover_output_dir(out)
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and latest.endswith("checkpoint-2")
    ok, tag = _complete(latest)
    assert ok and tag == ("b" if kill_at in ("payload-written", "fsynced", "old-set-aside") else "c")


@pytest.mark.slow  # a child python process with torch
def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint_exactly(tmp_path):
    """The trainer itself is killed (SIGKILL through the save hook) while writing checkpoint-2; the next run
    cleans the leftover, resumes from checkpoint-1 and ends where an uninterrupted run ends."""
    full = [h["loss"] for h in dpo(tmp_path / "full", max_steps=3, save_strategy="no").train()]
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(pathlib.Path(__file__).parent.parent)!r})
from fastalign import checkpoint as ckpt
from tests.run_state_cases import dpo
def hook(step, path):
    if step == "fsynced" and ".tmp-checkpoint-2-" in path:
        os.kill(os.getpid(), signal.SIGKILL)
ckpt.SAVE_STEP_HOOK = hook
dpo({str(tmp_path / "run")!r}, max_steps=3, save_steps=1).train()
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(n.startswith(".tmp-checkpoint-2") for n in os.listdir(tmp_path / "run"))
    resumed = dpo(tmp_path / "run", max_steps=3, save_steps=1)
    with pytest.warns(UserWarning, match=r"removed \.tmp-checkpoint-2-"):
        history = resumed.train(resume_from_checkpoint="latest")
    torch.testing.assert_close(torch.tensor([h["loss"] for h in history]), torch.tensor(full[1:]), rtol=0, atol=1e-6)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "run"))] == [1, 2, 3]


def test_save_total_limit_keeps_the_resumed_checkpoint_until_a_newer_one_exists(tmp_path):
    dpo(tmp_path, max_steps=2, save_steps=1, save_total_limit=1, lr_scheduler_type="constant").train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]
    t = dpo(tmp_path, max_steps=4, save_steps=1, save_total_limit=1, lr_scheduler_type="constant")

    def fail(step, path):
        if step == "payload-written":
            raise KeyboardInterrupt("killed while writing checkpoint-3")
    ckpt.SAVE_STEP_HOOK = fail
    try:
        with pytest.raises(KeyboardInterrupt):
            t.train("latest")
    finally:
        ckpt.SAVE_STEP_HOOK = None
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]
    dpo(tmp_path, max_steps=4, save_steps=1, save_total_limit=1, lr_scheduler_type="constant").train("latest")
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4]


# ---- full disk ---------------------------------------------------------------------------------------------------
def test_a_full_disk_is_named_keeps_the_previous_checkpoint_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = {"n": 0}

    def disk_full_on_second_save(obj, path):
        if "checkpoint-2" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)
        calls["n"] += 1
    monkeypatch.setattr(ckpt.torch, "save", disk_full_on_second_save)
    from fastalign.cli import main
    code = main(["train", "dpo", "--output-dir", str(tmp_path), "--max-steps", "3", "--save-steps", "1",
                 "--logging-steps", "1", "--per-device-train-batch-size", "4", "--disable-tqdm"])
    err = capsys.readouterr().err
    assert code == 1
    assert calls["n"] > 0  # checkpoint-1 was written
    assert "no space left on device while writing" in err and f"{tmp_path}/checkpoint-2/optimizer.pt" in err
    assert re.search(r"\(about \d+ MB needed, \d+ MB free\)", err) and "Traceback" not in err
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    ckpt.load_torch(str(tmp_path / "checkpoint-1" / "optimizer.pt"))  # the previous one is intact


def test_metrics_rows_are_whole_lines(tmp_path, monkeypatch):
    log = runlog.RunLog(str(tmp_path), "r1")
    log.write({"step": 1, "loss": 0.5})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runlog.os, "write", half_then_full)
    with pytest.raises(NoSpaceLeftError, match=r"no space left on device while writing .*metrics.jsonl"):
        log.write({"step": 2, "loss": 0.4})
    monkeypatch.undo()
    assert _rows(tmp_path / "metrics.jsonl") == [{"run_id": "r1", "segment": 0, "step": 1, "loss": 0.5}]


# ---- safe loading -----------------------------------------------------------------------------------------------
class _Malicious:
    marker = None

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pt"])
def test_resume_never_unpickles_code(tmp_path, name):
    dpo(tmp_path / "a", max_steps=1).train()
    path = tmp_path / "a" / "checkpoint-1" / name
    evil = _Malicious()
    evil.marker = str(tmp_path / "pwned")
    state = torch.load(path, weights_only=True)
    state["extra" if isinstance(state, dict) else 0] = evil
    torch.save(state, path)
    t = dpo(tmp_path / "b", max_steps=1)
    with pytest.raises(UnsafeCheckpointError, match=rf"{name} holds objects other than tensors and plain "
                                                    r"containers.*could run code"):
        t.train(str(tmp_path / "a" / "checkpoint-1"))
    assert not os.path.exists(tmp_path / "pwned")
    torch.load(path, weights_only=False)  # the file really does run code when unpickled
    assert os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize("name, damage", [("trainer_state.json", b""), ("trainer_state.json", b"{\"global_st"),
                                          ("model.safetensors", "half"), ("rng_state.pt", b""),
                                          ("optimizer.pt", "half"), ("scheduler.pt", b"\x00" * 64)])
def test_a_damaged_checkpoint_file_is_named_as_damaged_not_as_unsafe(tmp_path, name, damage):
    dpo(tmp_path, max_steps=2, save_steps=1, lr_scheduler_type="constant").train()
    path = tmp_path / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2] if damage == "half" else damage)
    with pytest.raises(DamagedCheckpointError, match=rf"{re.escape(str(path))} is damaged or truncated \(.*the "
                                                     r"checkpoint .*checkpoint-2 cannot be loaded. Resume from an "
                                                     r"earlier checkpoint"):
        dpo(tmp_path, max_steps=3, save_steps=1, lr_scheduler_type="constant").train(str(tmp_path / "checkpoint-2"))
    if name == "trainer_state.json":
        return
    # an earlier checkpoint's damage does not stand in the way of resuming from a later one
    dpo(tmp_path / "two", max_steps=2, save_steps=1, lr_scheduler_type="constant").train()
    (tmp_path / "two" / "checkpoint-1" / "trainer_state.json").write_bytes(b"")
    history = dpo(tmp_path / "two", max_steps=3, save_steps=1, lr_scheduler_type="constant").train("latest")
    assert [h["step"] for h in history if "loss" in h] == [3]


# ---- save_strategy ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, save_steps, expected", [("no", 2, []), ("steps", 0, [6]), ("steps", 4, [4, 6]),
                                                            ("epoch", 0, [4, 6])])
def test_save_strategy(tmp_path, strategy, save_steps, expected):
    t = dpo(tmp_path, max_steps=6, save_strategy=strategy, save_steps=save_steps, report_to="none")
    t.train()  # 16 rows, batches of 4: an epoch is 4 steps
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == expected


def test_new_options_are_validated():
    with pytest.raises(ConfigError, match="unknown save_strategy 'best'; valid: no, steps, epoch"):
        DPOConfig(save_strategy="best")
    with pytest.raises(ConfigError, match="overwrite_output_dir must be true or false, got 'yes'"):
        DPOConfig(overwrite_output_dir="yes")


# ---- metrics per run segment ------------------------------------------------------------------------------------
def test_a_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path):
    """logging_steps=4 and a checkpoint at step 3: the resumed run's first row averages steps 1-4, as the
    uninterrupted run's does. Its rows go to a new segment file, under the same run id; a torn last line left
    by the kill is dropped."""
    kw = dict(max_steps=6, logging_steps=4, save_steps=3)
    dpo(tmp_path / "full", **kw).train()
    full = _rows(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == [4, 6]
    crashed = dpo(tmp_path / "run", **kw)
    real_save = crashed.save_checkpoint

    def save_then_die():
        path = real_save()
        if crashed.global_step == 3:
            raise KeyboardInterrupt("killed after checkpoint-3")
        return path
    crashed.save_checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"run_id": "x", "loss": 0.69')  # a torn line
    resumed = dpo(tmp_path / "run", **kw)
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        resumed.train("latest")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    rows = _rows(tmp_path / "run" / "metrics-1.jsonl")
    assert {r["run_id"] for r in rows} == {crashed._run_id} and {r["segment"] for r in rows} == {1}

    def comparable(r):
        return {k: v for k, v in r.items() if k not in ("tokens_per_second", "run_id", "segment")}
    assert [comparable(r) for r in rows] == [comparable(r) for r in full]
    assert [comparable(r) for r in runlog.read_metrics(str(tmp_path / "run"))] == [comparable(r) for r in full]


def test_cli_refuses_a_used_folder_and_takes_resume_overwrite_and_allow_config_change(tmp_path, capsys):
    from fastalign.cli import main
    data = tmp_path.parent / f"{tmp_path.name}-prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = ["train", "dpo", "--output-dir", str(tmp_path), "--max-steps", "1", "--per-device-train-batch-size",
            "4", "--disable-tqdm", "--lr-scheduler-type", "constant", "--data", str(data)]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "holds the output of another run (checkpoint-1, metrics.jsonl, final)" in err and "Traceback" not in err
    assert main(base + ["--resume", "--learning-rate", "0.01"]) == 1  # bare --resume: the latest checkpoint
    assert "learning_rate: saved 0.001, now 0.01" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="learning_rate: saved 0.001, now 0.01"):
        assert main(base[:5] + ["2"] + base[6:] + ["--resume", "--learning-rate", "0.01", "--allow-config-change"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1, 2]
    assert main(base + ["--overwrite-output-dir"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1]


def test_a_changed_learning_rate_and_weight_decay_apply_from_the_first_resumed_step(tmp_path):
    """Under allow_config_change the new values are the ones used (and logged), not the checkpoint's: constant and
    cosine schedules; unchanged, the resumed rates are the saved ones (the exact-resume tests check the losses)."""
    dpo(tmp_path / "c", max_steps=2, save_steps=1, lr_scheduler_type="constant").train()
    t = dpo(tmp_path / "c", max_steps=4, save_steps=1, lr_scheduler_type="constant", learning_rate=1e-2,
            weight_decay=0.1, allow_config_change=True)
    with pytest.warns(UserWarning, match=r"learning_rate: saved 0.001, now 0.01"):
        history = t.train("latest")
    assert [h["learning_rate"] for h in history if "loss" in h] == [1e-2, 1e-2]
    assert all(g["weight_decay"] == 0.1 and g["initial_lr"] == 1e-2 for g in t.optimizer.param_groups)
    assert ckpt.read_state(ckpt.latest_checkpoint(str(tmp_path / "c")))["config"]["learning_rate"] == 1e-2

    dpo(tmp_path / "cos", max_steps=4, save_steps=2, lr_scheduler_type="cosine").train()
    plain = dpo(tmp_path / "cos", max_steps=6, save_steps=2, lr_scheduler_type="cosine", allow_config_change=True)
    with pytest.warns(UserWarning, match="max_steps"):
        want = [h["learning_rate"] for h in plain.train(str(tmp_path / "cos" / "checkpoint-4")) if "loss" in h]
    doubled = dpo(tmp_path / "cos2", max_steps=4, save_steps=2, lr_scheduler_type="cosine")
    doubled.train()
    t = dpo(tmp_path / "cos2", max_steps=6, save_steps=2, lr_scheduler_type="cosine", learning_rate=2e-3,
            allow_config_change=True)
    with pytest.warns(UserWarning, match="learning_rate"):
        got = [h["learning_rate"] for h in t.train("latest") if "loss" in h]
    assert len(got) == 2 and got == pytest.approx([2 * x for x in want], rel=1e-12)


# ---- rows written outside train(): evaluate() and save_model() ------------------------------------------------
def test_evaluate_and_save_model_before_train_are_the_runs_own(tmp_path):
    t = dpo(tmp_path, max_steps=2)
    before = t.evaluate(eval_dataset=OTHER_ROWS[:4])
    t.save_model()
    t.train()
    rows = runlog.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["eval_loss"] == before["eval_loss"]
    assert len({r["run_id"] for r in rows}) == 1
    t.evaluate(eval_dataset=OTHER_ROWS[:4])  # after train(): into the run's own segment, after its rows
    assert [r["step"] for r in runlog.read_metrics(str(tmp_path))] == [0, 1, 2, 2]


def test_evaluate_never_writes_into_another_runs_folder(tmp_path):
    dpo(tmp_path, max_steps=3, save_steps=3).train()
    history = runlog.read_metrics(str(tmp_path))
    other = dpo(tmp_path)
    with pytest.raises(RunStateError, match=r"holds the output of another run \(.*checkpoint-3.*report_to='none'"):
        other.evaluate(eval_dataset=OTHER_ROWS[:4])
    assert runlog.read_metrics(str(tmp_path)) == history
    quiet = dpo(tmp_path, report_to="none").evaluate(eval_dataset=OTHER_ROWS[:4])  # no file: allowed
    assert "eval_loss" in quiet and runlog.read_metrics(str(tmp_path)) == history
    over = dpo(tmp_path, max_steps=2, overwrite_output_dir=True)  # starting over there: its own rows stay
    over.evaluate(eval_dataset=OTHER_ROWS[:4])
    with pytest.warns(UserWarning, match=r"overwrite_output_dir: deleted checkpoint-3, metrics.jsonl from"):
        over.train()
    assert [r["step"] for r in runlog.read_metrics(str(tmp_path))] == [0, 1, 2]

    with held_by_another_process(tmp_path / "busy") as pid:  # a run in progress holds a fresh folder
        with pytest.raises(RunStateError, match=rf"in use by another run \(pid {pid}"):
            dpo(tmp_path / "busy").evaluate(eval_dataset=OTHER_ROWS[:4])
        assert runlog.metrics_files(str(tmp_path / "busy")) == []


def test_a_segment_of_evaluation_rows_replaces_no_history(tmp_path):
    log = runlog.RunLog(str(tmp_path), "r")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    runlog.RunLog(str(tmp_path), "r").write({"step": 0, "eval_loss": 0.5})
    assert [r["step"] for r in runlog.read_metrics(str(tmp_path))] == [1, 2, 3, 0]
    resumed = runlog.RunLog(str(tmp_path), "r")  # a resumed segment from step 3 on replaces step 3
    resumed.write({"step": 3, "loss": 0.3})
    assert [(r["step"], r.get("loss")) for r in runlog.read_metrics(str(tmp_path))][-2:] == [(0, None), (3, 0.3)]


def test_resume_from_checkpoint_true_means_the_latest_as_in_transformers(tmp_path):
    dpo(tmp_path, max_steps=2, save_steps=1, lr_scheduler_type="constant").train()
    history = dpo(tmp_path, max_steps=3, save_steps=1, lr_scheduler_type="constant").train(resume_from_checkpoint=True)
    assert [h["step"] for h in history if "loss" in h] == [3]
    history = dpo(tmp_path, max_steps=4, save_steps=1, lr_scheduler_type="constant",
                  resume_from_checkpoint=True).train()
    assert [h["step"] for h in history if "loss" in h] == [4]
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        dpo(tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(TypeError, match="resume_from_checkpoint must be a checkpoint folder, 'latest' or True, got int 3"):
        dpo(tmp_path).train(resume_from_checkpoint=3)


def test_num_tokens_counts_every_input_token_and_survives_a_resume(tmp_path):
    """TRL's num_tokens: the input tokens (padding left out) seen since the run began, carried across a resume."""
    t = dpo(tmp_path / "one", rows=ROWS, max_steps=1, per_device_train_batch_size=16)  # one step: every row once
    history = t.train()
    want = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in t.train_examples)
    assert history[0]["num_tokens"] == want
    full = [h["num_tokens"] for h in dpo(tmp_path / "full", max_steps=4, lr_scheduler_type="constant").train()]
    assert full == sorted(full) and full[0] > 0
    dpo(tmp_path / "cut", max_steps=2, save_steps=2, lr_scheduler_type="constant").train()
    resumed = dpo(tmp_path / "cut", max_steps=4, lr_scheduler_type="constant").train("latest")
    assert [h["num_tokens"] for h in resumed] == full[2:]
