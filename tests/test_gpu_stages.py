"""bench/run_gpu.sh, dry run on CPU (FASTALIGN_GPU_DRYRUN=1): the plumbing of the GPU stages, tested here because
the device machine is lent rarely and its one run must not be wasted. Each stage must leave its files in $OUT
as it goes (a log and a JSONL whose every line parses), within the device tool's limits on what comes back,
record each step's exit status, survive a step killed by its timeout, and exit 0 only when every step did."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run_gpu.sh")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
HEADS = ["kernels_qwen2.5-0.5b"]  # one head (FASTALIGN_GPU_HEADS): the dry run ignores --heads, so more add time only
BENCH = {"kernels": HEADS, "losses": ["bench_dpo_loss", "bench_nn_count"], "e2e": ["bench_e2e_dpo"],
         "peers": ["peers_linear_logprobs", "peers_dpo_loss"]}
SCRIPTS = {**{h: "bench_linear_logprobs.py" for h in HEADS}, "bench_dpo_loss": "bench_dpo_loss.py",
           "bench_nn_count": "bench_nn_count.py",
           "bench_e2e_dpo": "bench_e2e_dpo.py", "peers_linear_logprobs": "bench_linear_logprobs.py",
           "peers_dpo_loss": "bench_dpo_loss.py"}


def run_stage(tmp_path, stage, *args, **env):
    out = tmp_path / "out"
    full = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path), FASTALIGN_GPU_DRYRUN="1", PYTHON=sys.executable,
                OMP_NUM_THREADS="1", FASTALIGN_GPU_HEADS="qwen2.5-0.5b", **env)
    for key in ("TRITON_INTERPRET", "FASTALIGN_GPU_STEP_TIMEOUT", "FASTALIGN_GPU_STAGE_BUDGET"):
        if key not in env:
            full.pop(key, None)
    r = subprocess.run(["bash", SCRIPT, stage, *args], env=full, capture_output=True, text=True, timeout=400)
    return r, out


def check_out_folder(out, stage):
    """What the device tool brings back: at most 8 files, at most 2 folders down, plain names."""
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert 2 <= len(files) <= 8, files
    for f in files:
        parts = f.split(os.sep)
        assert len(parts) <= 3 and all(NAME.match(p) for p in parts), f
    assert {f"gpu-{stage}.log", f"gpu-{stage}.jsonl"} <= set(files)
    rows = [json.loads(line) for line in (out / f"gpu-{stage}.jsonl").read_text().splitlines()]
    first = [i for i, r in enumerate(rows) if r["kind"] == "environment"][0]
    env = rows[first]  # first but for the wheel install's rows (e2e, peers): it records what was installed
    assert all(r["kind"] in ("step", "missing") for r in rows[:first])
    assert env["source"] == "run_gpu.sh" and env["stage"] == stage
    assert env["dryrun"] is True and env["git_commit"] and env["date"] and env["versions"]["torch"]
    return rows


def steps(rows):
    return {r["step"]: r for r in rows if r["kind"] == "step"}


def test_unknown_stage_is_a_usage_error(tmp_path):
    r, out = run_stage(tmp_path, "everything")
    assert r.returncode == 2 and "usage: bash bench/run_gpu.sh {tests|kernels|losses|e2e|peers|all}" in r.stderr
    assert not out.exists() or not os.listdir(out)


def test_spent_budget_skips_steps_and_fails(tmp_path):
    """A stage whose budget is spent runs nothing more, says so per step, and exits 1."""
    r, out = run_stage(tmp_path, "tests", FASTALIGN_GPU_STAGE_BUDGET="12")
    assert r.returncode == 1, r.stdout[-2000:]
    rows = [json.loads(line) for line in (out / "gpu-tests.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["environment", "smoke", "gpu-tests"]
    assert all(r["rc"] is None and r["skipped"] == "budget spent" for r in rows)
    assert "SKIP smoke: the stage's budget (12s) is spent" in (out / "gpu-tests.log").read_text()


@pytest.mark.slow
def test_tests_stage(tmp_path):
    r, out = run_stage(tmp_path, "tests")
    assert r.returncode == 0, r.stdout[-3000:]
    rows = check_out_folder(out, "tests")
    st = steps(rows)
    assert list(st) == ["environment", "smoke", "gpu-tests"] and all(s["rc"] == 0 for s in st.values())
    smoke = [x for x in rows if x.get("benchmark") == "smoke" and x["kind"] == "row"]
    assert {x["backend"] for x in smoke} >= {"torch"} and all(x["ok"] for x in smoke)
    tests = [x for x in rows if x["kind"] == "test"]
    assert tests and all(x["outcome"] == "skipped" for x in tests)  # no CUDA here: the gpu tests skip
    assert any("test_gpu_triton_matches_reference" in x["test"] for x in tests)
    assert not any("test_bad_configs" in x["test"] for x in tests)  # only gpu-marked tests run there
    two = [x for x in tests if "test_ddp_on_two_gpus" in x["test"]]
    assert two and two[0]["reason"].endswith("needs 2 CUDA device(s), found no CUDA device")
    log = (out / "gpu-tests.log").read_text()
    assert "=== step gpu-tests: rc=0" in log and "skipped" in log


@pytest.mark.slow
def test_a_step_killed_by_its_timeout_keeps_earlier_rows(tmp_path):
    """smoke gets 1 s (it needs several): killed, recorded as timed out; the rows before it stay, the step after
    it still runs, and the stage exits 1."""
    r, out = run_stage(tmp_path, "tests", FASTALIGN_GPU_TIMEOUT_smoke="1")
    assert r.returncode == 1, r.stdout[-3000:]
    rows = check_out_folder(out, "tests")
    st = steps(rows)
    assert st["environment"]["rc"] == 0
    assert st["smoke"]["timed_out"] is True and st["smoke"]["rc"] in (124, 137) and st["smoke"]["timeout_s"] == 1
    assert st["gpu-tests"]["rc"] == 0
    assert "(TIMED OUT)" in (out / "gpu-tests.log").read_text()


def fake_wheel(folder, name="fa_fake_peer", version="1.2.3"):
    """A minimal pure-Python wheel, standing in for the peers' wheels of bench/gpu_wheels.sh."""
    import zipfile
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{info}/RECORD"])
    folder.mkdir()
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for k, v in files.items():
            z.writestr(k, v)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kernels", "losses", "e2e", "peers"])
def test_bench_stages(tmp_path, stage):
    """Each bench stage streams the bench's own rows (--jsonl) into the stage's JSONL; a bench script that is
    not in this checkout is a "missing" row, and the stage still succeeds. e2e also installs a wheel folder
    (as from bench/gpu_wheels.sh) and its environment row sees the installed package."""
    env = {}
    if stage == "e2e":
        fake_wheel(tmp_path / "whl")
        env = dict(FASTALIGN_GPU_WHEELS="1", FASTALIGN_GPU_WHEEL_DIR=str(tmp_path / "whl"))
    r, out = run_stage(tmp_path, stage, **env)
    rows = check_out_folder(out, stage)
    st = steps(rows)
    assert st["environment"]["rc"] == 0
    if stage == "e2e":
        assert st["wheels"]["rc"] == 0
        assert [x for x in rows if x["kind"] == "environment"][0]["wheels"] == {"fa_fake_peer": "1.2.3"}
    for name in BENCH[stage]:
        script = f"bench/{SCRIPTS[name]}"
        if not os.path.exists(os.path.join(ROOT, script)):
            assert any(x["kind"] == "missing" and x["what"] == script for x in rows)
            continue
        assert st[name]["rc"] == 0 and st[name]["timed_out"] is False, r.stdout[-3000:]
    benches = [x for x in rows if x["kind"] in ("environment", "row") and x.get("source") != "run_gpu.sh"]
    if any(name in st for name in BENCH[stage]):
        assert benches and benches[0]["kind"] == "environment" and any(x["kind"] == "row" for x in benches)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.slow
def test_a_flag_the_bench_does_not_take_is_recorded(tmp_path):
    """Extra arguments go to the stage's bench; one it does not take is a "missing" row and a failed step."""
    r, out = run_stage(tmp_path, "losses", "--no-such-flag")
    assert r.returncode == 1
    rows = check_out_folder(out, "losses")
    assert steps(rows)["bench_dpo_loss"]["rc"] == 2
    miss = [x for x in rows if x["kind"] == "missing"]
    assert miss and miss[0]["what"] == "bench/bench_dpo_loss.py unrecognized arguments: --no-such-flag"
