"""benchmarks/bench_convergence.py: the configs, pairing through the plugin's trainer, resume,
the AP curve and the plateau check."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bc():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_convergence", os.path.join(ROOT, "benchmarks", "bench_convergence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(bc, overrides, tmp_path, seed=0, **settings):
    cfg = bc.study_cfg(bc.Settings(**settings), overrides, "shapes_hard", seed,
                       str(tmp_path / "out"), str(tmp_path / "data"))
    cfg.freeze()
    return cfg


def test_parity_undoes_the_demo_recipe_departures_and_keeps_the_rest(bc, tmp_path):
    cfg = _cfg(bc, [], tmp_path, iters=960, steps=(0.75, 0.92))
    assert (cfg.MODEL.FPN.FUSE_TYPE, cfg.MODEL.FPN.UPSAMPLE_MODE) == ("sum", "nearest")
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "ConvUpsampleMaskHead"
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (960, (720, 883))
    assert cfg.DATASETS.TRAIN == ("shapes_hard_train",)
    assert cfg.DATASETS.TEST == ("shapes_hard_val",)
    # the demo recipe itself: batch, resolution, optimizer, precision
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.INPUT.MAX_SIZE_TRAIN, cfg.SOLVER.OPTIMIZER) == \
        (16, 160, "ADAMW")
    assert not cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.CHANNELS_LAST


@pytest.mark.parametrize("name", ["weighted_fusion", "bifpn", "mask_scoring", "panet_path"])
def test_each_config_starts_from_parity_weights_outside_its_modules(bc, tmp_path, name):
    variant = bc.CONFIGS[name]
    parity_cfg = _cfg(bc, [], tmp_path)
    model, own = bc.bv.build_paired_model(parity_cfg, _cfg(bc, variant.overrides(0), tmp_path), 0)
    reference, _ = bc.bv.build_paired_model(parity_cfg, parity_cfg, 0)
    assert own and all(k.startswith(variant.changes) for k in own), own
    state, ref = model.state_dict(), reference.state_dict()
    shared = [k for k in state if k not in own]
    assert len(shared) > 100
    assert all(torch.equal(state[k], ref[k]) for k in shared)
    assert os.path.isfile(os.path.join(ROOT, variant.yaml))


def test_recipe_digest_follows_the_recipe_not_the_seed_or_folders(bc, tmp_path):
    a = bc.recipe_digest(bc.Settings(), str(tmp_path / "a"))
    assert a == bc.recipe_digest(bc.Settings(), str(tmp_path / "b"))
    assert a != bc.recipe_digest(bc.Settings(iters=900), str(tmp_path / "a"))


def test_read_metrics_takes_the_last_line_of_an_iteration_after_a_resume(bc, tmp_path):
    path = tmp_path / "metrics.json"
    rows = [{"iteration": 19, "total_loss": 2.0, "time": 1.5},
            {"iteration": 39, "total_loss": 1.5, "time": 1.4, "segm/AP": 10.0, "bbox/AP": 9.0},
            {"iteration": 39, "total_loss": 1.4, "time": 1.3, "segm/AP": 11.0, "bbox/AP": 9.5},
            {"iteration": 59, "total_loss": 1.0, "time": 1.2},
            # the final evaluation is logged at the run's length (one more after a resume)
            {"iteration": 60, "segm/AP": 20.0, "bbox/AP": 19.0},
            {"iteration": 61, "segm/AP": 20.5, "bbox/AP": 19.5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    ap, loss, times = bc.read_metrics(str(path), 60)
    assert ap == [[40, 11.0, 9.5], [60, 20.5, 19.5]]
    assert loss == [[20, 2.0], [40, 1.4], [60, 1.0]]
    assert times == [1.5, 1.3, 1.2]


def test_plateau_needs_a_flat_last_quarter(bc):
    rising = [[i, float(i) / 10] for i in range(80, 961, 80)]  # +8 AP per evaluation
    flat = [[i, 50.0 + (0.3 if i % 160 else 0.0)] for i in range(80, 961, 80)]
    assert not bc.plateau(rising, 960, 1.0)["flat"]
    out = bc.plateau(flat, 960, 1.0)
    assert out["flat"] and out["iterations"] == [720, 800, 880, 960] and out["span"] == 0.3
    # one evaluation is no evidence of a plateau
    assert not bc.plateau([[960, 50.0]], 960, 1.0)["flat"]


def test_only_the_trainers_periodic_checkpoints_are_removed(bc, tmp_path):
    from fpn_plugin.io.output import OutputFolder

    for name in ("model_0000159.pth", "model_0000319.pth", "model_final.pth", "model_best.pth",
                 "notes.txt"):
        (tmp_path / name).write_text("x")
    folder = OutputFolder(str(tmp_path))
    # the run wrote all but model_0000319.pth, which was there before (not the plugin's)
    folder.record("model_0000159.pth", "model_final.pth", "model_best.pth", "notes.txt")
    removed = bc._remove_intermediate_checkpoints(folder)
    assert [os.path.basename(p) for p in removed] == ["model_0000159.pth"]
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith(".")) == [
        "model_0000319.pth", "model_best.pth", "model_final.pth", "notes.txt"]


def test_paired_runs_train_through_the_trainer_and_resume(bc, tmp_path, restore_loggers):
    """Real (tiny) runs: parity and a config see the same batches; a killed run resumes."""
    import multiprocessing

    from hostile_testutils import datasets_set_aside

    from fpn_plugin.data.shapes import SHAPES_DATASET_NAMES

    settings = bc.Settings(iters=4, steps=(0.5, 0.75), warmup=1, eval_period=2, num_train=8,
                           num_val=2, threads=1)
    work, data = str(tmp_path / "work"), str(tmp_path / "data")
    threads = torch.get_num_threads()
    spec = bc.bv.RunSpec("shapes_hard", "parity", 0)
    try:
        with datasets_set_aside(SHAPES_DATASET_NAMES):
            parity = bc.run_one(spec, settings, work, data)
            scoring = bc.run_one(bc.bv.RunSpec("shapes_hard", "mask_scoring", 0,
                                               ("mask_scoring",)), settings, work, data)
            # a finished folder resumes at its end: nothing is retrained
            again = bc.run_one(spec, settings, work, data)
    finally:
        torch.set_num_threads(threads)
    assert parity["data_fingerprint"] == scoring["data_fingerprint"] is not None
    assert scoring["own_modules"] and parity["own_modules"] == []
    assert [p[0] for p in parity["ap_curve"]] == [2, 4]
    assert set(parity["metrics"]) == {"bbox", "segm"}
    folder = os.path.join(work, "shapes_hard", "parity", "seed0")
    assert os.path.isfile(os.path.join(folder, "model_final.pth"))
    assert not [f for f in os.listdir(folder) if f.startswith("model_0")]
    assert again["resumed_at"] == 4 and again["data_fingerprint"] is None
    # no data-loader worker outlives its run (each would hold memory and the CPU lock's file)
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def _summary_with(bc, gains):
    """A stage-1 summary whose families have these paired mask-AP differences per seed."""
    spec = bc.bv.RunSpec
    records = []
    for seed in range(3):
        records.append(_record(spec("shapes_hard", "parity", seed), 50.0))
        for name, diffs in gains.items():
            records.append(_record(spec("shapes_hard", name, seed, (name,)), 50.0 + diffs[seed]))
    return bc.bv.summarize(records, bc.ORDER)


def _record(spec, mask_ap):
    return {"split": spec.split, "config": spec.config, "seed": spec.seed,
            "variants": list(spec.variants), "data_fingerprint": "f",
            "metrics": {"segm": {"AP": mask_ap}, "bbox": {"AP": mask_ap - 1}},
            "ap_curve": [[720, mask_ap, mask_ap - 1], [960, mask_ap, mask_ap - 1]],
            "run_seconds": 60.0}


def test_stage2_takes_the_best_family_and_the_significant_ones_that_combine(bc):
    summary = _summary_with(bc, {"weighted_fusion": [1.0, 1.2, 0.9], "bifpn": [2.0, 2.1, 1.9],
                                 "mask_scoring": [0.5, 0.7, 0.6], "panet_path": [3.0, -2.0, 0.1]})
    chosen = bc.select_stage2(summary, ["shapes_hard"])
    # BiFPN leads; weighted fusion is significant but BiFPN already fuses that way
    assert chosen == {"single": ["bifpn"], "combination": ["bifpn", "mask_scoring"]}
    specs = bc.stage2_specs(["shapes", "shapes_hard"], chosen, [3, 4, 5])
    assert len(specs) == 18 and {s.seed for s in specs} == {3, 4, 5}
    assert {(s.config, s.variants) for s in specs} == {
        ("parity", ()), ("bifpn", ("bifpn",)), ("plugin_best", ("bifpn", "mask_scoring"))}


def test_stage2_without_two_gains_has_no_combination(bc):
    summary = _summary_with(bc, {"weighted_fusion": [0.5, -0.4, 0.2], "bifpn": [-1.0, -2, -1.5],
                                 "mask_scoring": [-0.5, -0.7, -0.1], "panet_path": [-3, -2, -1]})
    chosen = bc.select_stage2(summary, ["shapes_hard"])
    assert chosen == {"single": ["weighted_fusion"], "combination": []}
    assert [s.config for s in bc.stage2_specs(["shapes"], chosen, [3])] == ["parity",
                                                                           "weighted_fusion"]
    # incompatible necks are never combined
    assert not bc.compatible(["bifpn", "panet_path"]) and bc.compatible(["panet_path",
                                                                          "weighted_fusion"])


def test_report_shows_both_stages_the_intervals_and_the_plateau(bc):
    gains = {"weighted_fusion": [1.0, 1.2, 0.9], "bifpn": [0.2, -0.3, 0.1],
             "mask_scoring": [0.5, 0.7, 0.6], "panet_path": [0.0, 0.4, -0.2]}
    summary = _summary_with(bc, gains)
    results = [_record(bc.bv.RunSpec("shapes_hard", "parity", 0), 50.0)]
    text = bc.format_markdown([("Stage 1", summary), ("Stage 2", summary)], results,
                              bc.Settings(recipe="abc"), 1.0, "cmd", {"cpu": "x"}, "2026-12-08")
    assert text.count("**shapes_hard**") == 2 and "**Stage 2**" in text
    assert "**+1.03 [" in text  # weighted fusion: significant, bold
    assert "| shapes_hard/parity/seed0 | 720: 50.0, 960: 50.0 | 0.0 | yes |" in text
    assert "LR x0.1 at 576 and x0.01 at 768" in text


def test_report_only_writes_tables_and_pictures_from_the_run_records(bc, tmp_path, monkeypatch):
    """--report-only: no training; the md/json and the pictures from finished run records
    (a seed whose curve misses an evaluation still plots)."""
    monkeypatch.setattr(bc.harness, "OUTPUT_DIR", str(tmp_path / "out"))
    args = ["--report-only", "--runs-dir", str(tmp_path / "runs"), "--data-root",
            str(tmp_path / "data"), "--configs", "parity", "weighted_fusion", "--seeds", "0",
            "1", "--best-seeds"]
    settings = bc.Settings()
    settings.recipe = bc.recipe_digest(settings, str(tmp_path / "data"))
    for seed in (0, 1):
        for config, ap in (("parity", 50.0), ("weighted_fusion", 51.0 + seed)):
            spec = bc.bv.RunSpec("shapes_hard", config, seed, () if config == "parity"
                                 else (config,))
            record = {**_record(spec, ap), "settings": settings.key(),
                      "curve": [[20, 2.0], [40, 1.5]]}
            if seed == 1:
                record["ap_curve"] = record["ap_curve"][1:]
            bc.bv.write_json_atomic(bc.bv.run_path(str(tmp_path / "runs"), spec), record)
    stages = bc.main(args)
    assert [t for t, _ in stages] == ["Stage 1: each family against parity, seeds [0, 1]"]
    row = stages[0][1]["shapes_hard"]["rows"]["weighted_fusion"]
    assert row["mask_diff"]["values"] == [1.0, 2.0]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted([
        "bench_convergence.json", "bench_convergence.md", "bench_convergence_curves.png",
        "bench_convergence_stage1.png", "bench_convergence_stage1_curves.png"])
    payload = json.loads((out / "bench_convergence.json").read_text())
    assert payload["settings"]["recipe"] == settings.recipe and len(payload["runs"]) == 4
    # a record made with other settings is not used
    with pytest.raises(SystemExit, match="no finished runs"):
        bc.main(args + ["--iters", "900"])


# The commit whose demo recipe the study froze (the study's first runs were made from it).
_STUDY_BASE_COMMIT = "3ccc94f"


def test_study_yaml_is_the_demo_recipe_it_froze(bc, tmp_path):
    """The frozen study config is the demo config of its base commit, key for key (so the
    study keeps its recipe when the demo's changes)."""
    from demo_testutils import demo_config_at

    from fpn_plugin.config import load_config

    demo = demo_config_at(_STUDY_BASE_COMMIT, tmp_path)
    assert load_config(bc.STUDY_YAML, []).dump() == load_config(demo, []).dump()


def test_tracked_results_wait_for_the_harness_registration(bc, monkeypatch):
    """--write-results is refused while the study is not in harness.MEASURED_PATHS (a tracked
    result must name the code it measures); nothing is trained or written."""
    monkeypatch.delitem(bc.harness.MEASURED_PATHS, bc.NAME, raising=False)
    monkeypatch.setattr(bc.bv, "execute", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(SystemExit, match="MEASURED_PATHS"):
        bc.main(["--write-results"])
