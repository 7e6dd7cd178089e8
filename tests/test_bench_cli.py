"""`fastalign bench` and the bench-script contract (bench/common.py): in a dry run (FASTALIGN_GPU_DRYRUN=1, tiny
shapes, one repeat) each op prints its markdown table, writes JSON and a PNG, streams --jsonl rows (environment
line first), and a peer that is not installed is a row saying so, not a failure. Bad arguments exit with 2."""
import json

import pytest
import torch

import fastalign as fa
from fastalign.cli import main


@pytest.fixture
def no_peers(monkeypatch):
    """Every peer (Liger, CCE, TRL) reported as not installed, whatever this machine has."""
    monkeypatch.setenv("FASTALIGN_GPU_DRYRUN", "1")
    from fastalign.cli.bench import bench_module
    bench_module("dpo_loss")  # puts the checkout on sys.path
    from bench import peers
    monkeypatch.setattr(peers, "installed", lambda module: False)


def _outputs(tmp_path, name):
    (js,) = tmp_path.glob(f"out/{name}-*-dryrun-*.json")
    (png,) = tmp_path.glob(f"out/{name}-*-dryrun-*.png")
    assert png.stat().st_size > 1000
    stream = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    assert stream[0]["kind"] == "environment" and stream[0]["benchmark"] == name
    assert {"device", "torch", "date", "git_commit", "cpu_model", "peers"} <= set(stream[0])
    assert all(r["kind"] == "row" for r in stream[1:]) and len(stream) > 1
    return json.load(open(js)), stream[1:]


def _args(tmp_path):
    return ["--out", str(tmp_path / "out"), "--jsonl", str(tmp_path / "rows.jsonl")]


def test_bench_dpo_loss_table_json_png_and_missing_peer_row(tmp_path, capsys, no_peers):
    assert main(["bench", "dpo_loss", *_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| variant | fwd+bwd (ms) | time vs naive |" in out.replace("shape | ", "")
    result, stream = _outputs(tmp_path, "dpo_loss")
    by_name = {r["variant"]: r for r in result["results"]}
    assert by_name["naive DPO"]["time_vs_naive"] == 1.0
    assert by_name["FusedDPOLoss[torch]"]["loss_abs_err"] < 1e-5  # the same loss as naive
    liger = next(r for name, r in by_name.items() if name.startswith("Liger"))
    assert "not installed" in liger["skipped"] and "not installed" in out
    assert {r["variant"] for r in stream} == set(by_name)


def test_bench_linear_logprobs_peers_rows(tmp_path, capsys, no_peers):
    # a dry run never fails its CHECK rows
    assert main(["bench", "linear_logprobs", "--chunk-rows", "3", *_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    result, _ = _outputs(tmp_path, "linear_logprobs")
    rows = result["results"]
    for peer in ("Liger FusedLinearCE", "CCE[cce]"):
        assert any(r["variant"] == peer and "not installed" in r["skipped"] for r in rows), peer
    measured = [r for r in rows if r["variant"] == "fastalign[torch]"]
    assert measured and all(r["value_rel_err"] < 1e-5 for r in measured)
    assert any(r.get("softcap") == 30.0 for r in measured)  # the Gemma-2-like head
    assert "| shape | pass | variant |" in out and "1 GEMM (floor)" in out
    if "cpp" in fa.available_backends():  # --chunk-rows: one more gradient-in-forward row per value
        chunked = [r for r in rows if r["variant"] == "fastalign NLL[cpp] grad-in-fwd chunk_rows=3" and "seconds" in r]
        assert chunked and all(r["value_rel_err"] < 1e-5 for r in chunked)


def test_bench_e2e_without_trl(tmp_path, capsys, no_peers):
    assert main(["bench", "e2e", "--shape", "2,64", "--repeats", "1", *_args(tmp_path)]) == 0
    result, _ = _outputs(tmp_path, "e2e_dpo")
    by_name = {r["variant"]: r for r in result["results"]}
    assert by_name["fastalign DPOTrainer"]["tokens_per_s"] > 0 and by_name["fastalign DPOTrainer"]["steps"] == 2
    assert "not installed" in by_name["TRL DPOTrainer"]["skipped"]
    assert "not installed" in by_name["TRL DPOTrainer + Liger"]["skipped"]


@pytest.mark.parametrize("argv, message", [
    (["linear_logprobs", "--shape", "1,2"], "expected N,H,V"),
    (["linear_logprobs", "--shape", "1,x,3"], "integers separated by commas"),
    (["linear_logprobs", "--shape", "4,0,8"], "positive"),
    (["linear_logprobs", "--heads", "--shape", "4,4,8"], "give one of them"),
    (["dpo_loss", "--dtype", "float16"], "float32 or bfloat16"),
    (["dpo_loss", "--heads"], "linear_logprobs only"),
    (["dpo_loss", "--chunk-rows", "64"], "linear_logprobs only"),
    (["linear_logprobs", "--chunk-rows", "0"], "--chunk-rows must be a positive integer"),
    (["e2e", "--dtype", "float32"], "--dtype does not apply"),
    (["e2e", "--repeats", "0"], "--repeats must be a positive integer"),
])
def test_bench_bad_arguments_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_unknown_op_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "softmax"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cpu_check_rows_name_the_variant_they_hold(monkeypatch, no_peers):
    """A CHECK row says which measured row it holds to naive's time (the FAIL line prints that name)."""
    monkeypatch.delenv("FASTALIGN_GPU_DRYRUN")
    from bench.bench_linear_logprobs import cpu_checks
    rows = [dict(shape="N=8", mode="fwd+bwd", variant="fastalign[auto]", time_vs_naive=1.2),
            dict(shape="N=8", mode="fwd", variant="fastalign[auto]", time_vs_naive=0.5),
            dict(shape="N=8", mode="fwd+bwd", variant="fastalign[torch]", time_vs_naive=3.0)]  # not checked
    checks = cpu_checks(rows)
    assert [(c["checked_variant"], c["mode"], c["status"]) for c in checks] == [
        ("fastalign[auto]", "fwd+bwd", "FAIL"), ("fastalign[auto]", "fwd", "PASS")]


def test_bench_nn_count_dry_run_single_run(tmp_path, capsys, no_peers):
    """bench/bench_nn_count.py in a dry run: every CPU backend against torch, GFLOP/s, JSON, --jsonl rows."""
    from bench.bench_nn_count import main as nn_main
    nn_main(["--single-run", "--tag", "t", *_args(tmp_path)])
    (js,) = tmp_path.glob("out/nn_count-t-*-dryrun-*.json")
    rows = json.load(open(js))["results"]
    assert {r["backend"] for r in rows} >= {"torch"} and all(r["seconds"] > 0 and r["gflops"] > 0 for r in rows)
    assert [r["speedup"] for r in rows if r["backend"] == "torch"] == [1.0]
    assert "| GFLOP/s | vs torch |" in capsys.readouterr().out


def test_interleaved_rounds_shuffle_the_order_and_pair_the_ratios(monkeypatch):
    """Each round runs every step once; the first in the given order, later ones shuffled (the same every run);
    paired_ratio is the median of the per-round ratios, not the ratio of the medians."""
    from fastalign.cli.bench import bench_module
    bench_module("dpo_loss")  # puts the checkout on sys.path
    from bench import common
    ran = []
    steps = {name: (lambda name: lambda: ran.append(name))(name) for name in "abcdef"}
    times = common.interleaved_times(steps, torch.device("cpu"), 4)
    rounds = [ran[i:i + 6] for i in range(0, 24, 6)]
    assert rounds[0] == list("abcdef") and all(sorted(r) == list("abcdef") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1 and all(len(t) == 4 for t in times.values())
    ran.clear()
    common.interleaved_times(steps, torch.device("cpu"), 4)
    assert [ran[i:i + 6] for i in range(0, 24, 6)] == rounds  # seeded: the same orders every run
    # a machine twice as slow in rounds 2 and 3: the variant is 1.1x the base in every round
    fake = {"base": [1.0, 2.0, 2.0, 1.0], "v": [1.1, 2.2, 2.2, 1.1]}
    assert common.paired_ratio(fake, "v", "base") == pytest.approx(1.1)
    fake = {"base": [1.0, 1.0, 3.0], "v": [1.2, 1.0, 3.0]}  # ratio of the medians 1.2 / 1.0; paired: median(1.2, 1, 1)
    assert common.paired_ratio(fake, "v", "base") == pytest.approx(1.0)
