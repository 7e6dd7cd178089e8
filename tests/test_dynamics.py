"""Learning dynamics: distinguishability, per-group training metrics, run analysis and `fastalign diagnose`."""
import json
import math

import numpy as np
import pytest

import fastalign as fa
from fastalign import dynamics as dyn
from fastalign.config import ConfigError, DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, DataError, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer

ROWS = load_rows(DEFAULT_PREFERENCES, "train")[:32]
EVAL = load_rows(DEFAULT_PREFERENCES, "test")[:12]


# ---- the float64 reference, written independently: loops, no centring, no weighting trick -----------------
def reference_value(chosen, rejected):
    c = [np.array(x, dtype=np.float64) for x in chosen]
    r = [np.array(x, dtype=np.float64) for x in rejected]
    n = len(c)
    c_bar, r_bar = sum(c) / n, sum(r) / n
    distance = math.sqrt(sum((a - b) ** 2 for a, b in zip(c_bar, r_bar)))
    ss = sum(float(((x - c_bar) ** 2).sum()) for x in c) + sum(float(((x - r_bar) ** 2).sum()) for x in r)
    spread = math.sqrt(ss / (2 * (n - 1)))
    return distance / spread, distance, spread


def reference_bootstrap(chosen, rejected, n_bootstrap, seed, confidence=0.95):
    rng = np.random.default_rng(seed)
    n = len(chosen)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap)
    values = []
    for w in counts:
        idx = np.repeat(np.arange(n), w)
        values.append(reference_value(chosen[idx], rejected[idx])[0])
    from statistics import NormalDist
    estimate = reference_value(chosen, rejected)[0]
    nd = NormalDist()
    frac = (sum(v < estimate for v in values) + 0.5 * sum(v == estimate for v in values)) / n_bootstrap
    z0 = nd.inv_cdf(min(max(frac, 0.5 / n_bootstrap), 1 - 0.5 / n_bootstrap))
    z = nd.inv_cdf(0.5 + confidence / 2)
    values = sorted(values)
    # numpy's "lower"/"higher" percentile = the order statistic at floor/ceil of q (k - 1)
    lo = values[math.floor(nd.cdf(2 * z0 - z) * (n_bootstrap - 1))]
    hi = values[math.ceil(nd.cdf(2 * z0 + z) * (n_bootstrap - 1))]
    return lo, hi


def test_distinguishability_matches_float64_reference():
    rng = np.random.default_rng(3)
    chosen = rng.normal(size=(9, 5)).astype(np.float32) + 100.0  # a large offset: centring must not lose digits
    rejected = rng.normal(size=(9, 5)).astype(np.float32) + 100.3
    res = dyn.distinguishability_from_features(chosen, rejected, n_bootstrap=200, seed=7)
    value, distance, spread = reference_value(chosen, rejected)
    assert res.n_pairs == 9
    assert res.value == pytest.approx(value, rel=1e-9)
    assert res.distance == pytest.approx(distance, rel=1e-9) and res.spread == pytest.approx(spread, rel=1e-9)
    lo, hi = reference_bootstrap(chosen, rejected, 200, seed=7)
    assert (res.ci_low, res.ci_high) == pytest.approx((lo, hi), rel=1e-7)
    assert res.ci_low <= res.value <= res.ci_high
    assert set(res.to_dict()) >= {"value", "ci_low", "ci_high", "n_pairs"}
    json.dumps(res.to_dict())


def test_distinguishability_of_two_pairs_warns_that_its_interval_is_unbounded():
    """2 pairs: half the resamples copy one pair (no spread, an infinite ratio), so the upper end is infinite and
    the caller is told why; 8 pairs bound it, without a warning."""
    import warnings
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(size=(8, 4)), rng.normal(size=(8, 4)) + 1.0
    with pytest.warns(UserWarning, match=r"of 200 bootstrap resamples of these 2 pairs drew copies of a single pair") \
            as caught:
        res = dyn.distinguishability_from_features(chosen[:2], rejected[:2], n_bootstrap=200, seed=0)
    assert caught[0].filename == __file__  # the warning points at the caller's line, not into fastalign
    assert math.isinf(res.ci_high) and math.isfinite(res.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dyn.distinguishability_from_features(chosen, rejected, n_bootstrap=200, seed=0)
    assert math.isfinite(res.ci_high)


def test_distinguishability_zero_for_identical_and_grows_with_separation():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8))
    res = dyn.distinguishability_from_features(base, base.copy(), seed=0)
    assert res.value == 0 and res.ci_low == 0 and res.ci_high == 0
    direction = rng.normal(size=8)
    noise = rng.normal(size=(20, 8))
    values = [dyn.distinguishability_from_features(base, base + noise * 0.5 + s * direction, n_bootstrap=0).value
              for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    # scale-free: the same geometry in other units gives the same value
    a = dyn.distinguishability_from_features(base, base + direction, n_bootstrap=0).value
    b = dyn.distinguishability_from_features(3 * base, 3 * (base + direction), n_bootstrap=0).value
    assert a == pytest.approx(b, rel=1e-12)


def test_distinguishability_of_a_model_on_rows_and_bad_input(tmp_path):
    model, tok = default_model_and_tokenizer(seed=0)
    rows = ROWS[:16]
    counts = {}
    for r in rows:
        counts[r["behaviour"]] = counts.get(r["behaviour"], 0) + 1
    small = {g for g, k in counts.items() if k < 2}
    rows = [r for r in rows if r["behaviour"] not in small]
    res = fa.distinguishability(model, tok, rows, groups="behaviour", layer=-1, n_bootstrap=50)
    assert set(res) == {r["behaviour"] for r in rows}
    values = [r.value for r in res.values()]
    assert values == sorted(values, reverse=True) and all(v > 0 for v in values)
    assert sum(r.n_pairs for r in res.values()) == len(rows)
    # the same rows from a file, another layer, last-token pooling, and one group over all rows
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = fa.distinguishability(model, tok, str(path), n_bootstrap=50)
    assert {g: r.value for g, r in again.items()} == pytest.approx({g: r.value for g, r in res.items()}, rel=1e-6)
    assert fa.distinguishability(model, tok, rows, layer=1, pooling="last", n_bootstrap=0)
    assert set(fa.distinguishability(model, tok, rows, groups=None, n_bootstrap=0)) == {"all"}
    with pytest.raises(DataError, match="group column 'topic' is in no row"):
        fa.distinguishability(model, tok, rows, groups="topic")
    lone = rows + [dict(rows[0], behaviour="lonely")]
    with pytest.raises(DataError, match=r"at least 2 pairs.*'lonely': 1 pair"):
        fa.distinguishability(model, tok, lone)
    with pytest.raises(ValueError, match="pooling"):
        fa.distinguishability(model, tok, rows, pooling="max")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        fa.distinguishability(model, tok, rows, layer=9)


def test_distinguishability_leaves_out_pairs_that_tokenization_drops():
    """Row 0's answers are identical once cut to max_length, so tokenization drops it: its group keeps the rest
    (this used to raise IndexError: the features were looked up as if every row had one)."""
    model, tok = default_model_and_tokenizer(seed=0)
    long = "a" * 60
    rows = [dict(prompt="Q", chosen=long + "X", rejected=long + "Y", behaviour="A")]
    rows += [dict(prompt=f"Say {i}", chosen=f"yes yes {i}", rejected=f"no no {i}", behaviour="AB"[i % 2])
             for i in range(6)]
    opts = dict(max_length=40, max_prompt_length=8, n_bootstrap=0, progress=False)
    with pytest.warns(UserWarning, match=r"dropped 1 of 7 pair\(s\).*row 0"):
        res = fa.distinguishability(model, tok, rows, **opts)
    assert {g: r.n_pairs for g, r in res.items()} == {"A": 3, "B": 3}
    without = fa.distinguishability(model, tok, rows[1:], **opts)
    assert {g: r.value for g, r in res.items()} == pytest.approx({g: r.value for g, r in without.items()}, rel=1e-9)
    with pytest.warns(UserWarning, match="dropped"), \
            pytest.raises(DataError, match=r"tokenization dropped.*'A': 1 of 2 pair\(s\) left"):
        fa.distinguishability(model, tok, rows[:2] + [r for r in rows if r["behaviour"] == "B"], **opts)


# ---- per-group training metrics --------------------------------------------------------------------------
def _recorded_trainer(tmp_path, rows=ROWS, **kw):
    """A DPOTrainer whose every training micro-batch's per-pair outputs and groups are recorded."""
    model, tok = default_model_and_tokenizer(seed=0)
    opts = dict(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=4, per_device_train_batch_size=4,
                max_length=96, max_prompt_length=64, logging_steps=2, gradient_accumulation_steps=2,
                disable_tqdm=True, seed=1, beta=0.5)
    opts.update(kw)
    t = DPOTrainer(model, tokenizer=tok, train_dataset=rows, eval_dataset=EVAL, config=DPOConfig(**opts))
    record, inner = [], t._metrics_of

    def spy(out):
        if t.model.training:
            record.append((list(t._batch_groups), {k: v.detach().double().clone()
                                                   for k, v in dyn.pair_metrics(out).items()}))
        return inner(out)
    t._metrics_of = spy
    return t, record


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_group_metrics_equal_recomputation_from_per_pair_outputs(tmp_path, loss_type):
    t, record = _recorded_trainer(tmp_path, loss_type=loss_type)
    history = t.train()
    assert len(history) == 2 and len(record) == 8  # 4 steps x 2 micro-batches, logged every 2 steps
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k not in ("run_id", "segment")} for row in logged] == history
    for i, h in enumerate(history):
        window = record[i * 4:(i + 1) * 4]
        groups = {g for gs, _ in window for g in gs}
        for g in groups:
            for m in dyn.GROUP_METRICS:
                vals = [float(v[m][j]) for gs, v in window for j, x in enumerate(gs) if x == g]
                assert h[f"groups/{g}/{m}"] == pytest.approx(sum(vals) / len(vals), rel=1e-5, abs=1e-6), (g, m)
        assert not any(k.endswith("/_pairs") for k in h)
        absent = set(t.group_names) - groups
        assert not any(k.startswith(f"groups/{g}/") for g in absent for k in h)
    # held-out evaluation per group equals the recomputation over the eval pairs
    ev = t.evaluate()
    by = {}
    for r in EVAL:
        by.setdefault(r["behaviour"], []).append(r)
    for g, rows in by.items():
        assert ev[f"eval_groups/{g}/n_pairs"] == len(rows)
        assert ev[f"eval_groups/{g}/rewards/accuracies"] == pytest.approx(ev[f"eval_accuracy/{g}"], abs=1e-9)
        assert ev[f"eval_groups/{g}/rewards/margins"] == pytest.approx(ev[f"eval_margin/{g}"], rel=1e-5, abs=1e-6)


def test_group_column_is_configurable_and_checked(tmp_path):
    rows = [dict(r, topic=r["behaviour"][:3]) for r in ROWS]
    t, _ = _recorded_trainer(tmp_path, rows=rows, group_column="topic", max_steps=2, logging_steps=1)
    h = t.train()
    assert t.group_names == sorted({r["topic"] for r in rows})
    logged_groups = {k.split("/")[1] for hh in h for k in hh if k.startswith("groups/")}
    assert logged_groups and logged_groups <= set(t.group_names)
    with pytest.raises(DataError, match="group_column 'nope' is in no row"):
        _recorded_trainer(tmp_path / "x", group_column="nope")
    t, _ = _recorded_trainer(tmp_path / "none", group_column=None, max_steps=1, logging_steps=1)
    assert not any(k.startswith("groups/") for k in t.train()[0])
    with pytest.raises(ConfigError, match="group_column"):
        DPOConfig(group_column="")


# ---- run analysis and `fastalign diagnose` ------------------------------------------------------------------
def test_learning_speed_helpers_on_old_and_new_metric_names(tmp_path):
    # the same curves written with the three namings a run may carry
    curves = {"fast": [0.5, 0.9, 1.0, 1.0], "slow": [0.5, 0.6, 0.7, 0.85], "never": [0.5, 0.5, 0.6, 0.5]}
    for fmt in ("eval_groups/{g}/rewards/accuracies", "eval/groups/{g}/rewards/accuracies", "eval/accuracy/{g}"):
        records = [{"loss": 0.7, "step": s} for s in (5, 15)]  # training records carry no eval accuracy
        records += [{fmt.format(g=g): c[i] for g, c in curves.items()} | {"step": 10 * i, "eval/loss": 0.6}
                    for i in range(4)]
        path = tmp_path / "metrics.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        speed = dyn.learning_speed(dyn.read_metrics(str(tmp_path)), threshold=0.8)
        assert {g: s["learning_step"] for g, s in speed.items()} == {"fast": 10, "slow": 30, "never": None}
        # trapezoid area over [0, 30] divided by 30
        assert speed["fast"]["auc"] == pytest.approx((0.7 + 0.95 + 1.0) * 10 / 30)
    cmp = dyn.compare({"fast": 3.0, "slow": 2.0, "never": 1.0}, speed)
    assert cmp["rho_auc"] == pytest.approx(1.0) and cmp["rho_learning_step"] == pytest.approx(1.0)
    assert math.isnan(cmp["rho_margin"])  # the run logged no margins
    records += [{"eval_groups/fast/rewards/margins": 0.0, "eval_groups/slow/rewards/margins": 0.0, "step": 0},
                {"eval_groups/fast/rewards/margins": 2.0, "eval_groups/slow/rewards/margins": 1.0, "step": 30}]
    speed = dyn.learning_speed(records)
    assert speed["fast"]["margin_auc"] == pytest.approx(1.0) and speed["slow"]["margin_auc"] == pytest.approx(0.5)
    cmp = dyn.compare({"fast": 1.0, "slow": 2.0, "never": 3.0}, speed)
    assert cmp["rho_auc"] == pytest.approx(-1.0)


def test_spearman_against_a_direct_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), rng.normal(size=12)
    rx, ry = np.argsort(np.argsort(x)) + 1, np.argsort(np.argsort(y)) + 1  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    assert dyn.spearman(x, y) == pytest.approx(1 - 6 * ((rx - ry) ** 2).sum() / (12 * (144 - 1)))
    assert dyn.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share their mean rank
    assert dyn.spearman([1, 2, math.inf], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(dyn.spearman([1, 1, 1], [1, 2, 3]))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny DPO run with per-group held-out evaluation, saved like `fastalign train dpo` saves it."""
    out = tmp_path_factory.mktemp("run")
    model, tok = default_model_and_tokenizer(seed=0)
    cfg = DPOConfig(output_dir=str(out), learning_rate=2e-3, max_steps=4, per_device_train_batch_size=4,
                    max_length=96, max_prompt_length=64, logging_steps=2, eval_steps=2, disable_tqdm=True, beta=0.5)
    t = DPOTrainer(model, tokenizer=tok, train_dataset=ROWS, eval_dataset=EVAL, config=cfg)
    t.train()
    t.save_model()
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return out, data


def test_diagnose_on_a_saved_run(saved_run, capsys):
    from fastalign.cli import main
    run, data = saved_run
    out = run / "diag"
    assert main(["diagnose", "--data", str(data), "--run", str(run), "--n-bootstrap", "50",
                 "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "diagnose.json").read_text())
    groups = {r["behaviour"] for r in ROWS}
    assert set(report["distinguishability"]) == groups and report["source"] == "held-out"
    assert set(report["observed"]) == {r["behaviour"] for r in EVAL}
    assert -1 <= report["rho_auc"] <= 1 and "Spearman rho" in text
    assert (out / "accuracy_per_group.png").stat().st_size > 0
    assert (out / "speed_vs_distinguishability.png").stat().st_size > 0
    # the observed curves are the run's eval records
    evals = [r for r in dyn.read_metrics(str(run)) if any("groups/" in k for k in r) and "eval" in "".join(r)]
    g = next(iter(report["observed"]))
    assert len(report["observed"][g]["steps"]) == len(evals) == 2


def test_diagnose_bad_input(saved_run, tmp_path, capsys):
    from fastalign.cli import main
    run, data = saved_run
    assert main(["diagnose", "--data", str(data), "--group-column", "topic", "--output-dir", str(tmp_path)]) == 2
    assert "group column 'topic' is in no row" in capsys.readouterr().err
    assert main(["diagnose", "--data", str(data), "--run", str(tmp_path / "nope"), "--n-bootstrap", "0",
                 "--output-dir", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_flip_group(saved_run, capsys):
    from fastalign.cli import main
    run, data = saved_run
    out = run / "flip"
    assert main(["diagnose", "--data", str(data), "--run", str(run), "--n-bootstrap", "0", "--output-dir", str(out),
                 "--flip-group", "honesty", "--flip-steps", "2", "--flip-eval-every", "1"]) == 0
    flip = json.loads((out / "diagnose.json").read_text())["flip"]
    assert set(flip) == {"base", "aligned"}
    for r in flip.values():
        assert [s for s, _ in r["curve"]] == [1, 2]
        assert r["steps_to_flip"] in (None, 1, 2)
    assert "steps to flip" in capsys.readouterr().out
    assert main(["diagnose", "--data", str(data), "--n-bootstrap", "0", "--output-dir", str(out),
                 "--flip-group", "nope", "--aligned", str(run / "final")]) == 2


def test_separation_data_controls_the_difference_by_construction():
    rows = load_rows(dyn_data_path())
    by = {}
    for r in rows:
        k = sum(a != b for a, b in zip(r["chosen"].split(), r["rejected"].split()))
        assert r["behaviour"] == f"differ-{k}" and len(r["chosen"].split()) == 8
        by.setdefault(r["prompt"], set()).add(r["behaviour"])
    assert all(len(v) == 4 for v in by.values())  # every prompt in every group


def dyn_data_path():
    from fastalign.dynamics_demo import SEPARATION
    return SEPARATION


@pytest.mark.slow
def test_dynamics_demo_runs(tmp_path, capsys):
    from fastalign.dynamics_demo import main
    assert main(["--only", "separation", "--separation-steps", "2", "--separation-eval-every", "1",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "differ-8" in out and "Spearman rho" in out
    assert (tmp_path / "separation_speed_vs_distinguishability.png").exists()


def test_group_column_labels_stay_with_their_rows_when_tokenization_drops_one(tmp_path):
    """Row 1's answers are identical once cut to max_length, so it is dropped: every later example must keep its
    own row's group (they were read by example count, so each took the group of the row before it)."""
    long = "a" * 80
    rows = [dict(r, topic=f"t{i}") for i, r in enumerate(ROWS[:6])]
    rows[1] = dict(rows[1], prompt="Q", chosen=long + "X", rejected=long + "Y")
    with pytest.warns(UserWarning, match=r"dropped 1 of 6 pair\(s\).*row 1"):
        t, _ = _recorded_trainer(tmp_path, rows=rows, group_column="topic", max_length=64, max_prompt_length=16,
                                 per_device_train_batch_size=1)
    assert [(e["row"], e["behaviour"]) for e in t.train_examples] == \
        [(f"row {i}", f"t{i}") for i in (0, 2, 3, 4, 5)]
