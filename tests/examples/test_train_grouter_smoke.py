"""The smoke scale of ``examples/train_grouter.py`` (issue 6, item 4) end to end, plus the
metric functions it reports with.

The pipeline runs in a subprocess, as a user runs it (the script re-executes itself to pin the
allocator, and it sets Dynamo limits for its own process only). Only that it works and that its
files are sane is asserted, never what it finds: a smoke run's numbers mean nothing. One check is
numeric on purpose: the compiled Grouter arm must match a hand-written eager Grouter mode.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_grouter.py"
sys.path.insert(0, str(ROOT / "examples"))

from grouter_training import metrics  # noqa: E402


def _has_grouter_mode() -> bool:
    try:
        from grouter_pass import GrouterRouting, trainable_parameters  # noqa: F401
    except ImportError:
        return False
    return True


# the module-scoped fixture below is costly: keep this file on one pytest-xdist worker
pytestmark = [pytest.mark.xdist_group("test_train_grouter_smoke"), pytest.mark.examples]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    if not _has_grouter_mode():
        pytest.skip("this checkout's grouter_pass has no Grouter mode (GrouterRouting) yet")
    out = tmp_path_factory.mktemp("train_grouter_smoke")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(out), "--no-progress",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc


def test_smoke_writes_every_output(smoke_run) -> None:
    out, proc = smoke_run
    for name in ("summary.json", "summary.md", "val_loss.csv", "val_loss.png", "expert_load.csv",
                 "expert_load.png", "train_log.csv"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    for png in ("val_loss.png", "expert_load.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png
    assert "Data utilisation" in proc.stdout and "throughput ratio" in proc.stdout


def test_smoke_summary_is_sane(smoke_run) -> None:
    out, _ = smoke_run
    s = json.loads((out / "summary.json").read_text())
    assert s["grouter_impl"] == "pass"
    for run in ("baseline", "grouter"):
        loss = s["final_val_loss"][run]
        assert math.isfinite(loss) and 0 < loss < math.log(257) + 0.2, (run, loss)
        assert s["median_step_seconds"][run] > 0
        assert s["timed_steps"][run] >= 1
        assert s["maxvio_validation"][run]["max"] >= 0
    assert s["throughput_ratio"] > 0
    util = s["data_utilisation"]
    assert util["ratio"] is None or util["ratio"] >= 0
    # the Grouter arm trains everything but the dead router weights
    assert s["trainable_parameters"]["baseline"] - s["trainable_parameters"]["grouter"] == s["router_parameters"] > 0
    # the graph rewrite computes Grouter mode: same loss as the hand-written eager reference
    par = s["parity"]
    assert par["abs_diff"] < 1e-4, par
    assert abs(par["compiled"] - par["own_router"]) > 10 * par["abs_diff"], f"the rewrite did not happen: {par}"
    assert s["distill"]["teacher_module"], "the detection pass found no teacher router"
    # Grouter mode routes every layer alike: identical rows in its load matrix
    with (out / "expert_load.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    by_layer: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        by_layer[(r["run"], r["layer"])].append(float(r["fraction"]))
    assert {run for run, _ in by_layer} == {"baseline", "grouter"}
    for key, fracs in by_layer.items():
        assert abs(sum(fracs) - 1) < 1e-4, key
    g_rows = [v for (run, _), v in sorted(by_layer.items()) if run == "grouter"]
    assert all(r == g_rows[0] for r in g_rows)


def test_smoke_curves_start_untrained_and_improve(smoke_run) -> None:
    out, _ = smoke_run
    with (out / "val_loss.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for run in ("baseline", "grouter"):
        curve = sorted(((int(r["step"]), float(r["val_loss"])) for r in rows if r["run"] == run))
        assert curve[0][0] == 0 and len(curve) >= 3, curve
        assert abs(curve[0][1] - math.log(257)) < 0.3, "an untrained byte LM starts near ln(257)"
        assert curve[-1][1] < curve[0][1], f"{run} did not learn: {curve}"


def test_smoke_rerun_skips_finished_phases_and_refuses_other_settings(smoke_run, caplog) -> None:
    """Resuming is per phase: a finished phase is reused (in-process here: no second interpreter
    start), and a result made with other settings is refused, naming the setting."""
    from grouter_training.pipeline import Pipeline, RunOptions
    from grouter_training.scales import get_scale

    out, _ = smoke_run
    caplog.set_level(logging.INFO, logger="grouter_training")
    pipe = Pipeline(get_scale("smoke"), RunOptions(out_dir=out, progress=False))
    for phase in ("data", "source", "distill", "tune", "tune_random", "targets"):
        assert getattr(pipe, phase)()["settings"], phase
        assert f"phase {phase}: done earlier" in caplog.text, phase
    other = Pipeline(get_scale("smoke").replace(target_seed=99), RunOptions(out_dir=out, progress=False))
    with pytest.raises(ValueError, match="target_seed: 2 -> 99"):
        other.targets()
    # each seed is kept on its own: a targets phase cut short keeps the seeds it finished
    (out / "targets" / "result.json").rename(out / "targets" / "result.json.saved")
    try:
        caplog.clear()
        again = pipe.targets()
        for seed in get_scale("smoke").target_seeds:
            assert f"seed {seed} done earlier" in caplog.text, seed
        assert "optimizer over" not in caplog.text   # no arm was built, let alone trained, again
        assert again["seeds"].keys() == json.loads((out / "targets" / "result.json.saved").read_text())["seeds"].keys()
    finally:
        (out / "targets" / "result.json.saved").replace(out / "targets" / "result.json")
    fewer = Pipeline(get_scale("smoke").replace(arms=("baseline", "grouter")), RunOptions(out_dir=out, progress=False))
    with pytest.raises(ValueError, match="arms: .* -> \\['baseline', 'grouter'\\]"):
        fewer.targets()


def test_smoke_trains_every_arm_for_every_seed(smoke_run) -> None:
    """Each arm is what its name says: learned arms train their routers (and only the z-loss arm
    has a z-loss), frozen arms leave the router weights out; every seed ran every arm."""
    from grouter_training.arms import ARMS
    from grouter_training.scales import get_scale

    out, _ = smoke_run
    s = json.loads((out / "summary.json").read_text())
    scale = get_scale("smoke")
    assert set(ARMS) == set(scale.arms) and s["arms"]["seeds"] == list(scale.target_seeds) and len(scale.seeds) >= 2
    stats = s["arms"]["statistics"]
    assert s["arms"]["order"] == list(scale.arms) and set(stats) == set(scale.arms)
    for arm, st in stats.items():
        assert st["final_val_loss"]["n"] == len(scale.target_seeds), arm
        assert st["final_val_loss"]["se"] is not None and st["final_val_loss"]["se"] >= 0, arm
    assert stats["baseline"]["equal_data_gap"]["mean"] == 0.0
    res = json.loads((out / "targets" / "result.json").read_text())
    router = res["router_parameters"]
    for seed, runs in res["seeds"].items():
        base = runs["baseline"]["trainable_parameters"]
        for arm, run in runs.items():
            frozen = not ARMS[arm].learned
            assert run["trainable_parameters"] == base - (router if frozen else 0), (seed, arm)
            zs = [r["z"] for r in run["train_log"]]
            assert (min(zs) > 0) if ARMS[arm].z_loss_coef else (max(zs) == 0), (seed, arm)
    # a checkpoint per arm and seed, the first seed where two-arm runs always kept theirs
    first, *others = scale.target_seeds
    for arm in scale.arms:
        assert (out / "targets" / arm / "checkpoint.pt").is_file(), arm
        for seed in others:
            assert (out / "targets" / f"seed{seed}" / arm / "checkpoint.pt").is_file(), (seed, arm)
    with (out / "val_loss_arms.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["arm"] for r in rows} == set(scale.arms) and all(r["seed_1"] for r in rows)
    assert (out / "val_loss_arms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Every arm, 2 seeds" in (out / "summary.md").read_text()


# ------------------------------------------------------------------------------------ metrics

def _curve(points: list[tuple[int, float]]) -> list[dict[str, float]]:
    return [{"step": i, "tokens": t, "val_loss": v} for i, (t, v) in enumerate(points)]


def test_tokens_to_reach_interpolates_the_first_crossing() -> None:
    curve = _curve([(0, 5.0), (100, 3.0), (200, 2.0), (300, 2.5), (400, 1.0)])
    assert metrics.tokens_to_reach(curve, 4.0) == pytest.approx(50)
    assert metrics.tokens_to_reach(curve, 2.0) == pytest.approx(200)
    assert metrics.tokens_to_reach(curve, 1.5) == pytest.approx(300 + 100 * (2.5 - 1.5) / 1.5)
    assert metrics.tokens_to_reach(curve, 0.5) is None


def test_data_utilisation_ratio_and_not_reached() -> None:
    base = _curve([(0, 5.0), (1000, 3.0)])
    util = metrics.data_utilisation(base, _curve([(0, 5.0), (500, 2.0)]))
    assert util.target_loss == 3.0 and util.tokens_needed == pytest.approx(1000 / 3)
    assert util.ratio == pytest.approx(1 / 3) and util.speedup == pytest.approx(3.0)
    never = metrics.data_utilisation(base, _curve([(0, 5.0), (1000, 3.5)]))
    assert never.tokens_needed is None and never.ratio is None and never.speedup is None


def test_max_violation_and_step_median() -> None:
    import torch

    load = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0]])
    assert metrics.max_violation_per_layer(load) == pytest.approx([0.0, 3.0])
    summary = metrics.load_summary(load)
    assert summary["global"] == pytest.approx(50 / 20 - 1)
    times = [{"seconds": 9.0, "counted": 0.0}, {"seconds": 1.0, "counted": 1.0}, {"seconds": 3.0, "counted": 1.0},
             {"seconds": 2.0, "counted": 1.0}]
    assert metrics.median_step_seconds(times) == 2.0
    assert metrics.median_step_seconds(times[:1]) is None


def test_the_data_phase_cuts_the_source_share_at_a_document_boundary(tmp_path) -> None:
    from grouter_training.pipeline import Pipeline, RunOptions
    from grouter_training.scales import get_scale

    from grouter_pass.router import TokenizedCorpus

    scale = get_scale("smoke").replace(source_fraction=0.8)
    result = Pipeline(scale, RunOptions(out_dir=tmp_path, progress=False)).data()
    source, target = (TokenizedCorpus.load(tmp_path / "data" / n) for n in ("source", "target"))
    total = source.num_tokens + target.num_tokens
    assert total == scale.train_tokens
    # the cut is the first document boundary at or after 80% of the tokens
    assert source.doc_offsets[-2] < 0.8 * total <= source.num_tokens
    cfg_s, cfg_t = scale.source_train, scale.target_train
    assert result["source_to_target_tokens"] == pytest.approx(
        cfg_s.steps * cfg_s.tokens_per_step / (cfg_t.steps * cfg_t.tokens_per_step))
    with pytest.raises(ValueError, match="source_fraction=1.0"):
        scale.replace(source_fraction=1.0)


def test_the_paper_regime_trains_the_source_on_ten_times_the_target_budget_without_repeats() -> None:
    from grouter_training.scales import get_scale

    scale = get_scale("paper-cpu")
    src, tgt = scale.source_train, scale.target_train
    source_budget, target_budget = src.steps * src.tokens_per_step, tgt.steps * tgt.tokens_per_step
    assert source_budget >= 10 * target_budget and source_budget >= 20_000_000
    assert source_budget <= scale.train_tokens * scale.source_fraction   # each source token seen once
    assert target_budget <= scale.train_tokens * (1 - scale.source_fraction)
    assert scale.model == get_scale("cpu").model and tgt == get_scale("cpu").target_train


def test_smoke_leak_test_separates_causal_from_bidirectional_routing(smoke_run) -> None:
    """The causal Grouter's prefix-only routing is its training routing (no jump at all); the
    bidirectional one's differs (its routing at t reads t+1), so its two losses differ."""
    out, _ = smoke_run
    leak = json.loads((out / "summary.json").read_text())["leak_test"]
    assert set(leak) == {"grouter", "grouter_bidir"}
    assert leak["grouter"]["causal"] and not leak["grouter_bidir"]["causal"]
    assert abs(leak["grouter"]["jump"]) < 1e-5, leak["grouter"]
    assert abs(leak["grouter_bidir"]["jump"]) > 1e-5, leak["grouter_bidir"]
    for t in leak.values():
        assert 0 < t["training_routing"] < math.log(257) + 0.2 and t["tokens"] > 0
    assert "Leak test" in (out / "summary.md").read_text()


def test_prefix_routing_of_a_causal_grouter_is_its_routing_and_of_a_bidirectional_one_is_not() -> None:
    from grouter_training.pipeline import PrefixRouter

    from grouter_pass.router import Grouter, GrouterModelConfig

    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    for causal in (True, False):
        torch.manual_seed(0)
        g = Grouter(GrouterModelConfig(vocab_size=257, num_experts=8, top_k=2, hidden_size=16, num_heads=2,
                                       num_layers=1, intermediate_size=32, causal=causal)).eval()
        with torch.no_grad():
            w, i = g.route_flat(ids)
        pw, pi = PrefixRouter(g).route_flat(ids)
        # the last position sees the whole sequence either way
        assert torch.equal(pi.reshape(2, 12, 2)[:, -1], i.reshape(2, 12, 2)[:, -1])
        if causal:
            assert torch.equal(pi, i) and torch.allclose(pw, w, atol=1e-6)
        else:
            assert not torch.allclose(pw, w, atol=1e-4)


def test_smoke_grouter_arms_train_on_pre_dispatched_routing(smoke_run) -> None:
    """The paper's setting: the Grouter arms' graphs read routing delivered with the batch (no
    Grouter inside the timed step), and the compiled arm still computes Grouter mode."""
    out, _ = smoke_run
    s = json.loads((out / "summary.json").read_text())
    assert s["predispatch"] is True
    assert "routing pre-dispatched" in (out / "summary.md").read_text()
    assert s["parity"]["abs_diff"] < 1e-4


def test_every_phase_a_scale_runs_is_a_choice_of_until() -> None:
    """(The script is not imported: it re-executes itself to pin the allocator.)"""
    from grouter_training.pipeline import ALL_PHASES, Pipeline, RunOptions
    from grouter_training.scales import SCALES, get_scale

    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120,
                               cwd=ROOT).stdout
    for phase in ALL_PHASES:
        assert phase in help_text, phase
    for name in SCALES:
        phases = Pipeline(get_scale(name), RunOptions(out_dir=Path("unused"))).phases()
        assert phases == [p for p in ALL_PHASES if p in phases] and {"data", "source", "targets"} <= set(phases)
    assert "tune_bidir" in Pipeline(get_scale("paper-cpu"), RunOptions(out_dir=Path("unused"))).phases()


def test_smoke_aux_free_arm_moves_its_selection_biases_by_the_load(smoke_run) -> None:
    """Each step moves every bias by exactly the rate, up or down (the sign of mean - load):
    after n steps each bias is a multiple of the rate, at most n of them, and not all zero."""
    from grouter_training.scales import get_scale

    out, _ = smoke_run
    steps = get_scale("smoke").target_train.steps
    state = torch.load(out / "targets" / "aux_free" / "checkpoint.pt", map_location="cpu", weights_only=False)
    biases = [v for k, v in state["model"].items() if k.endswith("mlp.gate.selection_bias")]
    assert biases and any(b.abs().max() > 0 for b in biases)
    for b in biases:
        multiples = b / 1e-3
        assert torch.allclose(multiples, multiples.round(), atol=1e-3) and multiples.abs().max() <= steps
    res = json.loads((out / "targets" / "result.json").read_text())
    seed = res["seeds"]["2"]
    assert seed["aux_free"]["trainable_parameters"] == seed["baseline"]["trainable_parameters"]


def test_compare_script_tabulates_a_finished_run_and_an_unfinished_one(smoke_run, tmp_path) -> None:
    out, _ = smoke_run
    (tmp_path / "unfinished").mkdir()
    png = tmp_path / "compare.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "grouter_training" / "compare.py"), f"{out}=smoke",
                           f"{tmp_path / 'unfinished'}=later", "--png", str(png)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| smoke |") or ln.startswith("| later |")]
    assert len(rows) == 2 and "(not finished)" in rows[1], proc.stdout
    assert png.stat().st_size > 0
