"""benchmarks/bench_variants.py: pairing, interval arithmetic, resume, selection and outputs."""
import importlib.util
import json
import math
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bv():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_variants", os.path.join(ROOT, "benchmarks", "bench_variants.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- statistics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                          (5, 2.5706), (9, 2.2622), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_student_t_tables(bv, df, expected):
    assert bv.t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_other_confidence_and_bad_input(bv):
    assert bv.t_quantile(0.99, 4) == pytest.approx(4.6041, abs=1e-4)
    assert bv.t_quantile(0.90, 2) == pytest.approx(2.9200, abs=1e-4)
    with pytest.raises(ValueError):
        bv.t_quantile(0.95, 0)


def test_paired_interval_arithmetic(bv):
    out = bv.paired_interval([1.0, 2.0, 3.0])
    # mean 2, SD 1, half-width t(0.975, 2) * 1 / sqrt(3)
    half = 4.302653 / math.sqrt(3)
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["low"] == pytest.approx(2.0 - half, abs=1e-5)
    assert out["high"] == pytest.approx(2.0 + half, abs=1e-5)
    single = bv.paired_interval([0.7])
    assert single["mean"] == 0.7 and single["low"] is None


# --- pairing ------------------------------------------------------------------------------------
def _study_cfg(bv, overrides, seed=0):
    return bv.study_cfg(bv.Settings(image_size=64), overrides, "shapes", "/nonexistent", seed)


@pytest.mark.parametrize("name", ["panet_path", "weighted_fusion", "bilinear", "neck_gn", "p3p7",
                                  "unshared_rpn", "per_level_anchors", "per_level_topk",
                                  "panet_mask"])
def test_variant_starts_from_parity_weights_outside_its_modules(bv, name):
    variant = bv.VARIANTS[name]
    parity_cfg = _study_cfg(bv, [])
    model, own = bv.build_paired_model(parity_cfg, _study_cfg(bv, variant.overrides(64)), 0)
    parity, _ = bv.build_paired_model(parity_cfg, parity_cfg, 0)
    reference = parity.state_dict()
    state = model.state_dict()
    # Only the changed modules have weights of their own ...
    assert all(k.startswith(variant.changes) for k in own), own
    assert bool(own) == bool(variant.changes)
    # ... everything else starts exactly where the parity model starts.
    shared = [k for k in state if k not in own]
    assert len(shared) > 100
    for k in shared:
        assert torch.equal(state[k], reference[k]), k
    # The same seed builds the same parity model again (the reference is reproducible).
    again, _ = bv.build_paired_model(parity_cfg, parity_cfg, 0)
    assert all(torch.equal(v, reference[k]) for k, v in again.state_dict().items())


def test_without_the_copy_new_modules_would_shift_the_other_weights(bv):
    """Why the copy is needed: seeding before building is not enough once a module is added."""
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(0)
    parity = build_model(_study_cfg(bv, [])).state_dict()
    seed_all_rng(0)
    panet = build_model(_study_cfg(bv, bv.VARIANTS["panet_path"].overrides(64))).state_dict()
    heads = [k for k in parity if k.startswith("roi_heads.box_head")]
    assert heads and any(not torch.equal(parity[k], panet[k]) for k in heads)
    # A different seed gives different weights, so equality above is not trivial.
    other, _ = bv.build_paired_model(_study_cfg(bv, [], 1), _study_cfg(bv, [], 1), 1)
    assert not torch.equal(other.state_dict()["roi_heads.box_head.fc1.weight"],
                           parity["roi_heads.box_head.fc1.weight"])


def test_paired_runs_see_the_same_data_in_the_same_order(bv, tmp_path):
    """Three real (tiny) runs: a variant draws parity's batches and flips; another seed does not."""
    from hostile_testutils import datasets_set_aside

    from fpn_plugin.data.shapes import SHAPES_DATASET_NAMES

    settings = bv.Settings(iters=3, batch=2, image_size=64, num_train=6, num_val=2, threads=1)
    data = str(tmp_path / "data")
    threads = torch.get_num_threads()  # run_one sets the study's thread count, as its CLI does
    try:
        with datasets_set_aside(SHAPES_DATASET_NAMES):
            parity = bv.run_one(bv.RunSpec("shapes", "parity", 0), settings, data, curve_every=1)
            panet = bv.run_one(bv.RunSpec("shapes", "panet_path", 0, ("panet_path",)), settings,
                               data, curve_every=1)
            other_seed = bv.run_one(bv.RunSpec("shapes", "parity", 1), settings, data)
            rerun = bv.run_one(bv.RunSpec("shapes", "parity", 0), settings, data, curve_every=1)
    finally:
        torch.set_num_threads(threads)
    assert parity["data_fingerprint"] == panet["data_fingerprint"]
    assert other_seed["data_fingerprint"] != parity["data_fingerprint"]
    assert panet["own_modules"][0].startswith("backbone.pan_")
    assert parity["own_modules"] == []
    assert [p[0] for p in parity["curve"]] == [1, 2, 3]
    assert set(parity["metrics"]) == {"bbox", "segm"}
    # A run is reproducible: the same spec again gives the same losses and AP.
    assert rerun["curve"] == parity["curve"] and rerun["metrics"] == parity["metrics"]


# --- study bookkeeping --------------------------------------------------------------------------
def _fake_record(spec, mask_ap, box_ap, fingerprint="f"):
    return {"split": spec.split, "config": spec.config, "seed": spec.seed,
            "variants": list(spec.variants), "metrics": {"segm": {"AP": mask_ap},
                                                         "bbox": {"AP": box_ap}},
            "curve": [[10, 1.0], [20, 0.5]], "data_fingerprint": fingerprint,
            "train_seconds": 1.0, "eval_seconds": 0.5}


def test_resume_skips_finished_runs_and_reruns_stale_ones(bv, tmp_path):
    settings = bv.Settings(iters=7)
    specs = bv.stage1_specs(["shapes"], ["parity", "neck_gn"], [0, 1])
    calls = []

    def fake_run(spec, progress):
        calls.append(spec.run_id)
        return {**_fake_record(spec, 10.0 + spec.seed, 9.0), "settings": settings.key()}

    runs = str(tmp_path / "runs")
    first = bv.execute(specs, settings, runs, fake_run, lock="")
    assert calls == ["shapes/parity/seed0", "shapes/neck_gn/seed0",
                     "shapes/parity/seed1", "shapes/neck_gn/seed1"]
    assert [r["seed"] for r in first] == [0, 0, 1, 1]
    assert all("run_seconds" in r for r in first)
    # Each run file says where it was measured: commit and tree state loaded, machine, time.
    for record in first:
        prov = record["provenance"]
        assert set(prov) >= {"commit", "dirty", "hostname", "cpu_flags", "measured_at"}
        assert prov["measured_at"].startswith(time.strftime("%Y-"))
    line = bv.runs_provenance(first + [{"seed": 9}])
    assert first[0]["provenance"]["measured_at"][:10] in line
    assert "1 runs without provenance" in line
    calls.clear()
    again = bv.execute(specs, settings, runs, fake_run, lock="")
    assert calls == [] and again == first  # everything read back, nothing trained
    # A run of other settings, a damaged file and a missing one are (re)run; the rest is kept.
    path = bv.run_path(runs, specs[1])
    with open(path) as f:
        stale = json.load(f)
    stale["settings"]["iters"] = 8
    with open(path, "w") as f:
        json.dump(stale, f)
    with open(bv.run_path(runs, specs[2]), "w") as f:
        f.write("{truncated")
    os.remove(bv.run_path(runs, specs[3]))
    bv.execute(specs, settings, runs, fake_run, lock="")
    assert calls == ["shapes/neck_gn/seed0", "shapes/parity/seed1", "shapes/neck_gn/seed1"]


def test_every_stage_records_the_provenance_the_study_started_with(bv, tmp_path, monkeypatch):
    """The study takes its provenance once: a second stage run after the tree changed (here:
    harness.provenance would now answer another commit) still names the code it loaded."""
    started = {"commit": "aaaaaaaaaa", "dirty": False, "hostname": "h", "cpu_flags": []}
    monkeypatch.setattr(bv.harness, "provenance", lambda: dict(started, commit="bbbbbbbbbb"))

    def fake_run(spec, progress):
        return {**_fake_record(spec, 1.0, 1.0), "settings": bv.Settings().key()}

    runs = str(tmp_path / "runs")
    stage1 = bv.execute(bv.stage1_specs(["shapes"], ["parity"], [0]), bv.Settings(), runs,
                        fake_run, lock="", loaded_from=started)
    stage2 = bv.execute(bv.stage2_specs(["shapes"], ["neck_gn"], [3]), bv.Settings(), runs,
                        fake_run, lock="", loaded_from=started)
    assert [r["provenance"]["commit"] for r in stage1 + stage2] == ["aaaaaaaaaa"] * 3
    # without it, execute takes the provenance itself, before its runs
    alone = bv.execute(bv.stage1_specs(["shapes"], ["neck_gn"], [1]), bv.Settings(), runs,
                       fake_run, lock="")
    assert alone[0]["provenance"]["commit"] == "bbbbbbbbbb"


def test_execute_holds_the_cpu_lock_during_each_run_only(bv, tmp_path):
    import fcntl

    lock = str(tmp_path / "cpu.lock")
    held = []

    def probe():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def fake_run(spec, progress):
        held.append(probe())
        return {**_fake_record(spec, 1.0, 1.0), "settings": bv.Settings().key()}

    bv.execute(bv.stage1_specs(["shapes"], ["parity"], [0, 1]), bv.Settings(),
               str(tmp_path / "runs"), fake_run, lock=lock)
    assert held == [True, True]
    assert not probe()  # released after the last run


def test_cpu_lock_is_released_while_a_process_forked_in_the_run_lives_on(bv, tmp_path):
    """A data-loader worker forked during a run inherits the lock's file: the lock must still
    end with the run (closing the file alone left it held by the worker)."""
    import fcntl
    import multiprocessing

    lock = str(tmp_path / "cpu.lock")
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    with bv.cpu_lock(lock):
        child = ctx.Process(target=stop.wait, args=(60,))
        child.start()
    try:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while anyone holds it
        finally:
            os.close(fd)
        assert child.is_alive()  # the forked process still has the file open
    finally:
        stop.set()
        child.join(10)


def _study_results(bv):
    """Stage 1 on two splits (3 seeds) and stage 2 (2 fresh seeds), with known APs."""
    results = []
    gains = {"neck_gn": (2.0, 1.0), "panet_path": (1.0, -0.5), "bilinear": (-1.0, -1.0)}
    for split_i, split in enumerate(bv.SPLITS):
        for seed in (0, 1, 2):
            base = 20.0 + seed
            results.append(_fake_record(bv.RunSpec(split, "parity", seed), base, base - 2))
            for name, g in gains.items():
                noise = 0.1 * seed
                results.append(_fake_record(bv.RunSpec(split, name, seed, (name,)),
                                            base + g[split_i] + noise, base - 2 + noise))
        for seed in (3, 4):
            results.append(_fake_record(bv.RunSpec(split, "parity", seed), 30.0, 28.0))
            results.append(_fake_record(bv.RunSpec(split, "plugin_best", seed, ("neck_gn",)),
                                        32.0 + seed, 28.0))
    return results


def test_summary_pairs_by_seed_and_selects_the_families_that_gain_on_both_splits(bv):
    results = _study_results(bv)
    summary = bv.summarize([r for r in results if r["config"] != "plugin_best"])
    assert bv.select_best(summary) == ["neck_gn"]  # panet_path gains on one split only
    summary = bv.summarize(results)
    rows = summary["shapes"]["rows"]
    assert list(rows) == ["parity", "panet_path", "bilinear", "neck_gn", "plugin_best"]
    assert rows["parity"]["seeds"] == [0, 1, 2, 3, 4]
    gn = rows["neck_gn"]
    assert gn["mask_diff"]["values"] == pytest.approx([2.0, 2.1, 2.2])
    assert gn["mask_diff"]["mean"] == pytest.approx(2.1)
    assert gn["mask_diff"]["low"] == pytest.approx(2.1 - 4.302653 * 0.1 / math.sqrt(3), abs=1e-5)
    assert gn["mask_mean"] == pytest.approx(23.1) and gn["mask_sd"] == pytest.approx(1.1)
    best = rows["plugin_best"]
    assert best["seeds"] == [3, 4] and best["mask_diff"]["values"] == [5.0, 6.0]
    assert summary["shapes"]["same_data_per_seed"]
    # A run that saw other batches than its seed's parity run is flagged.
    results[1]["data_fingerprint"] = "other"
    assert not bv.summarize(results)["shapes"]["same_data_per_seed"]
    # Nothing gains on both splits: the best single family on average.
    for r in results:
        if r["config"] == "neck_gn" and r["split"] == "shapes_hard":
            r["metrics"]["segm"]["AP"] -= 5
    stage1 = [r for r in results if r["config"] != "plugin_best"]
    assert bv.select_best(bv.summarize(stage1)) == ["panet_path"]


def test_combined_overrides_merge_and_refuse_clashes(bv, monkeypatch):
    both = bv.combined_overrides(["neck_gn", "panet_path"], 128)
    assert both == ["MODEL.FPN.NORM", "GN", "MODEL.FPN.BOTTOM_UP_PATH", True]
    monkeypatch.setitem(bv.VARIANTS, "clash", bv.Variant("x", "", lambda s: ["MODEL.FPN.NORM", "BN"]))
    with pytest.raises(ValueError, match="MODEL.FPN.NORM"):
        bv.combined_overrides(["neck_gn", "clash"], 128)


def test_every_variant_builds_with_its_study_overrides_and_names_a_shipped_config(bv):
    for name, variant in bv.VARIANTS.items():
        assert os.path.isfile(os.path.join(ROOT, variant.yaml)), name
    cfg = _study_cfg(bv, bv.combined_overrides(list(bv.VARIANTS), 64))
    assert cfg.MODEL.FPN.BOTTOM_UP_PATH and cfg.MODEL.RPN.IN_FEATURES[-1] == "p7"


def test_outputs_write_tables_pictures_and_the_readme_block(bv, tmp_path, monkeypatch):
    monkeypatch.setattr(bv.harness, "RESULTS_DIR", str(tmp_path / "tracked"))
    monkeypatch.setattr(bv.harness, "OUTPUT_DIR", str(tmp_path / "out"))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:bench_variants -->\nold\n<!-- /bench:bench_variants -->\nend\n")
    results = _study_results(bv)
    for r in results:
        r["run_seconds"] = 60.0
    summary = bv.summarize(results)
    settings = bv.Settings()
    # Default: untracked output only, README untouched.
    bv.write_outputs(summary, results, settings, ["neck_gn"], "cmd", False, readme=str(readme))
    assert (tmp_path / "out" / "bench_variants.md").is_file()
    assert "old" in readme.read_text() and not (tmp_path / "tracked").exists()
    md = bv.write_outputs(summary, results, settings, ["neck_gn"], "cmd", True, readme=str(readme))
    text = readme.read_text()
    block = text.split("<!-- bench:bench_variants -->\n")[1].split("<!-- /bench:bench_variants -->")[0]
    assert block == md == (tmp_path / "tracked" / "bench_variants.md").read_text()
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert f"{len(results)} runs, {len(results)} min under the CPU lock" in md
    assert "| GroupNorm in the neck | 0,1,2 | 23.10 ± 1.10 | **+2.10 [+1.85, +2.35]** |" in md
    assert "| **plugin best**: neck_gn | 3,4 | 35.50 ± 0.71 | +5.50 [-0.85, +11.85] |" in md
    payload = json.loads((tmp_path / "tracked" / "bench_variants.json").read_text())
    assert payload["plugin_best"] == ["neck_gn"] and payload["cpu_seconds"] == 60.0 * len(results)
    for picture in ("bench_variants.png", "bench_variants_curves.png"):
        with open(tmp_path / "tracked" / picture, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_select_best_combines_only_significant_gains(bv):
    """A positive mean whose interval contains 0 is noise: it is not combined."""
    def row(mean, low):
        return {"mask_diff": {"mean": mean, "low": low}}

    summary = {"shapes_hard": {"rows": {
        "weighted_fusion": row(2.1, 0.3),   # significant
        "panet_path": row(0.9, -2.1),       # positive mean, interval contains 0
        "bilinear": row(1.5, 0.1),          # significant
        "p3p7": row(-9.7, -12.6)}}}
    assert bv.select_best(summary, ["shapes_hard"]) == ["weighted_fusion", "bilinear"]
    # Significant on one split but not the other: not chosen; nothing significant anywhere:
    # the single family with the best mean over the splits.
    summary["shapes"] = {"rows": {"weighted_fusion": row(1.0, -0.5), "panet_path": row(0.8, -1.0),
                                  "bilinear": row(-0.2, -2.0), "p3p7": row(-3.0, -5.0)}}
    assert bv.select_best(summary, ["shapes_hard", "shapes"]) == ["weighted_fusion"]
    assert bv.select_best(summary, ["shapes"]) == ["weighted_fusion"]
    summary["shapes"]["rows"]["weighted_fusion"] = row(-1.0, -3.0)
    assert bv.select_best(summary, ["shapes_hard", "shapes"]) == ["panet_path"]
