"""benchmarks.suite: tasks build, train and are bitwise reproducible; faults hit exactly their iterations; stats
verdicts; the runner records failures and fits both policy styles (guard after backward, line search closure)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repository root

from benchmarks.suite import faults as fl  # noqa: E402
from benchmarks.suite import runner, stats, tasks  # noqa: E402
from benchmarks.suite.faults import Fault, FaultPlan, Injector  # noqa: E402

SCALE = 0.1  # smaller data and runs: these tests check behaviour, not results
ALL = list(tasks.TASKS)


@pytest.fixture(autouse=True)
def _one_thread():
    # the suite's runs use one thread (run_many's workers); it is also much faster on a shared 2-core machine
    threads, flush = torch.get_num_threads(), runner._flush_enabled()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


# ------------------------------------------------------------------------------------------------------- tasks
def test_registry_covers_the_required_kinds_and_splits():
    assert len(ALL) >= 12
    kinds = [t.kind for t in tasks.TASKS.values()]
    assert len(set(kinds)) == len(kinds)  # each task a different kind
    text = " ".join(kinds).lower()
    for word in ("tabular", "regression", "transformer language model", "rnn", "batchnorm", "matrix factorisation",
                 "ill-conditioned", "fine-tuning", "label noise", "dropout + weight decay"):  # fmt: skip
        assert word in text, word
    assert set(tasks._DATA) <= set(ALL)  # preload() knows every task's data set
    tune, report = tasks.names("tune"), tasks.names("report")
    assert abs(len(tune) - len(report)) <= 1 and sorted(tune + report) == sorted(ALL)
    for half in (tune, report):  # neither half is all classification
        runs = [tasks.make(n, 0, SCALE) for n in half]
        assert any(r.metric.startswith("accuracy") for r in runs)
        assert any(r.metric in ("mse", "rmse", "r2") for r in runs)


@pytest.mark.parametrize("name", ALL)
def test_task_builds_trains_and_is_bitwise_reproducible(name):
    def losses(seed: int) -> tuple[list[float], list[torch.Tensor], dict]:
        run = tasks.make(name, seed, SCALE)
        assert run.name == name and run.split in tasks.SPLITS and run.iterations >= 10
        assert run.sgd_lr > 0 and run.adam_lr > 0
        res = runner.train(run, runner.adam(), iterations=6)
        assert res.error is None, res.error
        return res.losses, params(run.model), res.final

    a, pa, final = losses(0)
    b, pb, final_b = losses(0)
    c, _, _ = losses(1)
    assert len(a) == 6 and all(math.isfinite(x) for x in a)
    assert a == b and all(torch.equal(x, y) for x, y in zip(pa, pb)) and final == final_b  # same seed: same bits
    assert a != c  # another seed: another run
    assert {"train_loss", "val_loss", "val_metric", "test_loss", "test_metric"} <= final.keys()
    assert all(math.isfinite(v) for v in final.values())


@pytest.mark.parametrize("name", ALL)
def test_batches_restart_and_builds_do_not_touch_global_rng(name):
    before = torch.random.get_rng_state()
    run = tasks.make(name, 3, SCALE)
    assert torch.equal(torch.random.get_rng_state(), before)  # make() forks the global generator
    s1, s2 = run.batches(), run.batches()
    for _ in range(3):
        (x1, y1), (x2, y2) = next(s1), next(s2)
        assert torch.equal(x1, x2)
        assert all(torch.equal(u, v) for u, v in zip(y1 if isinstance(y1, tuple) else (y1,),
                                                      y2 if isinstance(y2, tuple) else (y2,)))  # fmt: skip


def test_label_noise_flips_forty_percent_and_finetune_starts_pretrained():
    run = tasks.make("label_noise", 0)
    assert 0.37 < run.info["flipped"] < 0.43
    ft = tasks.make("finetune", 0, SCALE)
    fresh = tasks.make("finetune", 0, SCALE)
    assert all(torch.equal(a, b) for a, b in zip(params(ft.model), params(fresh.model)))
    scratch = tasks._mlp([64, 128, 128, 128])  # same shapes as the backbone, not trained
    assert not torch.equal(ft.model[0][0].weight, scratch[0].weight)


def test_illconditioned_task_has_condition_number_near_1e4():
    run = tasks.make("illcond_lstsq", 0)
    assert 3e3 < run.info["condition_number"] < 3e4


# ------------------------------------------------------------------------------------------------------- faults
BATCH_KINDS = {"scale": Fault("scale", 3, 1, 1e3), "nan": Fault("nan", 4), "shuffle": Fault("shuffle", 5, 2),
               "drift": Fault("drift", 6, 4, 3.0)}  # fmt: skip
N = 12


def _targets(y):
    return y if isinstance(y, tuple) else (y,)


def _first_layer_outputs(run, plan):
    """Per iteration: the batch and the first layer's output during its forward (with the plan's faults)."""
    inj = Injector(run, plan)
    seen = []
    h = run.first_layer.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    out = []
    try:
        stream = inj.batches(run.batches())
        with torch.no_grad():
            for i in range(N):
                batch = next(stream)
                with inj.step(i):
                    run.model(batch[0])
                out.append((batch, seen.pop()))
            run.model(next(run.batches())[0])  # a clean batch outside a step: never faulted
            after = seen.pop()
    finally:
        h.remove()
        inj.close()
    return out, after


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_batch_fault_changes_exactly_its_iterations(name, kind):
    run = tasks.make(name, 0, SCALE)
    fault = BATCH_KINDS[kind]
    plan = FaultPlan(kind, (fault,), seed=1)
    hit = set(plan.iterations(until=N))
    clean, clean_after = _first_layer_outputs(run, FaultPlan("none"))
    bad, bad_after = _first_layer_outputs(run, plan)
    assert torch.equal(clean_after, bad_after)
    for i, (((x0, y0), h0), ((x1, y1), h1)) in enumerate(zip(clean, bad)):
        same_y = all(torch.equal(a, b) for a, b in zip(_targets(y0), _targets(y1)))
        if kind == "shuffle":
            assert torch.equal(x0, x1) and torch.equal(h0, h1)
            assert same_y == (i not in hit), i
            if i in hit:  # a permutation of the same targets
                for a, b in zip(_targets(y0), _targets(y1)):
                    assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
            continue
        assert same_y
        if i not in hit:
            assert torch.equal(x0, x1) and torch.equal(h0, h1), i
            continue
        # the inputs themselves (float features), or the first layer's output (ids)
        before, after = (h0, h1) if run.input_kind == "tokens" else (x0, x1)
        if run.input_kind == "tokens":
            assert torch.equal(x0, x1)
        if kind == "nan":
            assert int(after.isnan().sum()) == 1 and not before.isnan().any()
        else:
            k = fault.factor if kind == "scale" else fault.drift_scale(i)
            assert k > 1 and torch.equal(after, before * k), i


def test_drift_ramps_smoothly_and_holds():
    f = Fault("drift", 10, 200, 3.0)
    s = [f.drift_scale(i) for i in range(0, 300)]
    assert s[:10] == [1.0] * 10 and s[209] == 3.0 and s[-1] == 3.0
    steps = [b - a for a, b in zip(s, s[1:])]
    assert max(steps) <= 2.0 / 200 + 1e-12 and min(steps) >= 0  # smooth: never a jump


def test_lr_spike_hits_exactly_its_steps_and_is_undone():
    run = tasks.make("wine_zero", 0, SCALE)
    opt = torch.optim.SGD([{"params": [run.model[0].weight], "lr": 0.1}, {"params": [run.model[0].bias], "lr": 0.03}])
    plan = FaultPlan("lr", (Fault("lr", 3, 2, 50.0),))
    inj = Injector(run, plan)
    seen = []
    for i in range(8):
        with inj.step(i, opt):
            seen.append([g["lr"] for g in opt.param_groups])
        assert [g["lr"] for g in opt.param_groups] == [0.1, 0.03]  # exactly the old values afterwards
    assert seen == [[0.1, 0.03]] * 3 + [[0.1 * 50, 0.03 * 50]] * 2 + [[0.1, 0.03]] * 3
    with inj.step(3, opt):  # a policy halves the lr inside the step: its change survives the undo
        for g in opt.param_groups:
            g["lr"] /= 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.015], rel=1e-15)


def test_standard_plans_are_deterministic_and_fit_the_run():
    for name in fl.PLANS:
        a, b = FaultPlan.standard(name, 400, seed=2), FaultPlan.standard(name, 400, seed=2)
        assert a == b and FaultPlan.from_dict(json.loads(json.dumps(a.to_dict()))) == a
        assert all(0 < f.at < 400 for f in a.faults)
        short = FaultPlan.standard(name, 30, seed=2)
        assert all(f.at + (f.length if f.kind != "drift" else 1) <= 30 for f in short.faults)
    assert FaultPlan.standard("mixed", 400, 0) != FaultPlan.standard("mixed", 400, 1)  # jittered by the seed
    kinds = {f.kind for f in FaultPlan.standard("mixed", 400).faults}
    assert kinds == {"scale", "nan", "lr", "shuffle"}
    with pytest.raises(ValueError, match="unknown fault plan"):
        FaultPlan.standard("nope", 100)


def test_faults_reach_training_through_the_runner():
    run = tasks.make("diabetes_regression", 0, SCALE)
    clean = runner.train(run, runner.sgd(), iterations=12)
    plan = FaultPlan("x", (Fault("scale", 5, 1, 1e3), Fault("lr", 8, 2, 10.0)))
    run = tasks.make("diabetes_regression", 0, SCALE)
    res = runner.train(run, runner.sgd(), faults=plan, iterations=12)
    assert res.losses[:5] == clean.losses[:5] and res.losses[5] > 100 * clean.losses[5]
    assert res.lrs == clean.lrs  # the spike is undone after each of its steps
    assert res.faults == plan.to_dict()


# ------------------------------------------------------------------------------------------------------- stats
def test_compare_verdicts():
    a, b = [1.0, 1.1, 0.9, 1.05, 0.95], [2.0, 2.1, 1.9, 2.05, 1.95]
    assert stats.compare(a, b, lower_is_better=True) == "win"
    assert stats.compare(a, b, lower_is_better=False) == "loss"
    assert stats.compare(b, a, lower_is_better=True) == "loss"
    assert stats.compare(a, [x + 0.01 for x in a], lower_is_better=True) == "tie"  # well within 2 SE
    # the 2-SE boundary: diff 0.5, SE of the difference sqrt(2) * sem
    x = [0.0, 1.0, 2.0]  # sem = 1/sqrt(3)
    se = math.hypot(stats.sem(x), stats.sem(x))
    assert stats.compare([v + 2 * se * 0.99 for v in x], x, lower_is_better=False) == "tie"
    assert stats.compare([v + 2 * se * 1.01 for v in x], x, lower_is_better=False) == "win"
    # paired: a constant per-seed improvement wins even when seeds vary a lot
    noisy = [0.0, 10.0, 20.0]
    assert stats.compare([v - 1 for v in noisy], noisy, lower_is_better=True) == "tie"
    assert stats.compare([v - 1 for v in noisy], noisy, lower_is_better=True, paired=True) == "win"
    # zero variance
    assert stats.compare([1.0, 1.0], [1.0, 1.0], lower_is_better=True) == "tie"
    assert stats.compare([1.0, 1.0], [2.0, 2.0], lower_is_better=True) == "win"
    # a diverged run is the worst outcome
    assert stats.compare([float("nan"), 1.0], [5.0, 5.0], lower_is_better=True) == "loss"
    assert stats.compare([5.0], [float("inf")], lower_is_better=True) == "win"
    assert stats.compare([float("nan")], [float("nan")], lower_is_better=False) == "tie"


def test_stats_helpers():
    assert stats.mean([1, 2, 3]) == 2 and stats.std([1, 2, 3]) == 1 and stats.sem([1, 2, 3]) == 1 / math.sqrt(3)
    assert stats.std([4.0]) == 0.0 and math.isnan(stats.mean([]))
    assert stats.fmt([0.1, 0.2]) == "0.150 ± 0.071" and stats.fmt([1e-5, 3e-5]) == "2.00e-05 ± 1.4e-05"
    assert stats.fmt([0.97, 0.99], percent=True) == "98.0 ± 1.4%"
    assert stats.fmt([float("nan"), 1.0]) == "1.00, nan in 1/2"
    t = stats.table(["a", "b"], [[1, "x"]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]


# ------------------------------------------------------------------------------------------------------- runner
def test_runner_catches_an_exception_in_a_step():
    def failing(run, opt):
        calls = []

        def step(loss):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("boom at the fourth step")
            opt.step()

        return runner.Step(after_backward=step)

    res = runner.train(tasks.make("wine_zero", 0, SCALE), runner.adam(), step=failing, iterations=10)
    assert res.error["type"] == "RuntimeError" and "boom" in res.error["message"] and res.error["iteration"] == 3
    assert res.completed == 3 and len(res.losses) == 3
    assert "train_loss" in res.final  # still evaluated
    json.dumps(res.to_dict())


def test_step_before_runs_before_each_forward():
    order = []

    def step(run, opt):
        h = run.model.register_forward_pre_hook(lambda m, a: order.append("forward"))
        return runner.Step(before=lambda: order.append("before"), after_backward=lambda loss: opt.step(),
                           close=h.remove)  # fmt: skip

    res = runner.train(tasks.make("wine_zero", 0, SCALE), runner.adam(), step=step, iterations=4)
    assert res.error is None and order == ["before", "forward"] * 4  # evaluation ran after close removed the hook


def test_runner_plugs_in_guards_and_line_searches():
    pytest.importorskip("torchrewind")
    run = tasks.make("wine_zero", 0, SCALE)
    plain = runner.train(run, runner.adam(), iterations=20, eval_every=5)
    assert plain.forwards == plain.backwards == 20 and plain.batch_index == list(range(20))
    assert [i for i, _ in plain.evals] == [5, 10, 15] and plain.evals[0][1].keys() == plain.final.keys()
    guard = runner.train(tasks.make("wine_zero", 0, SCALE), runner.adam(),
                         step=runner.policy("SpikeGuard", capacity=4), faults=FaultPlan("n", (Fault("nan", 12),)),
                         iterations=20)  # fmt: skip
    assert guard.error is None and guard.step_info["skipped"] >= 1
    assert [12, "skipped"] in guard.to_dict()["step_info"]["events"]  # attributed to the faulty iteration
    assert guard.losses[:12] == plain.losses[:12]  # the guard changes nothing before the fault
    assert math.isfinite(guard.final["train_loss"])
    ls = runner.train(tasks.make("wine_zero", 0, SCALE), runner.sgd(lr=1.0), step=runner.policy("LineSearch"),
                      iterations=20)  # fmt: skip
    assert ls.error is None and ls.step_info["iterations"] == 20
    assert ls.forwards == ls.step_info["forwards"] and ls.backwards == ls.step_info["backwards"] == 20
    assert ls.forwards >= 40  # one trial forward at least per iteration


def test_run_many_parallel_matches_in_process_and_caches(tmp_path):
    configs = [runner.Config("adam", runner.adam(), iterations=12),
               runner.Config("sgd-burst", runner.sgd(), faults="burst", iterations=12)]  # fmt: skip
    names = ["wine_zero", "recommender", "illcond_lstsq"]  # features, ids, a float64 optimum
    cache = tmp_path / "study.json"
    par = runner.run_many(configs, names, seeds=[0, 1], workers=2, scale=SCALE, cache=cache, progress=False)
    seq = runner.run_many(configs, names, seeds=[0, 1], workers=0, scale=SCALE, progress=False)
    assert [r["key"] for r in par] == [r["key"] for r in seq] and len(par) == 12
    assert [(r["losses"], r["final"]) for r in par] == [(r["losses"], r["final"]) for r in seq]  # workers: same bits
    assert all(r["error"] is None and r["completed"] == 10 for r in par)  # 12 * scale -> the 10-iteration minimum
    json.loads(json.dumps(par))
    assert json.loads(cache.read_text())["results"]
    broken = [runner.Config(c.name, lambda run: 1 / 0) for c in configs]  # same names: served from the cache
    again = runner.run_many(broken, names, seeds=[0, 1], workers=2, scale=SCALE, cache=cache, progress=False)
    assert [r["losses"] for r in again] == [r["losses"] for r in par]
    fresh = runner.run_many(broken[:1], names[:1], seeds=[5], workers=0, scale=SCALE, progress=False)
    assert fresh[0]["error"]["type"] == "ZeroDivisionError"  # reported, not raised
