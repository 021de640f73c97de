"""benchmarks/bench_demo.py turns one whole demo run's own files into the demo's figures, and
refuses runs whose times are not one run's."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench_demo():
    spec = importlib.util.spec_from_file_location(
        "bench_demo_under_test", os.path.join(ROOT, "benchmarks", "bench_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(box, mask):
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {"bbox": {k: box + i for i, k in enumerate(keys)},
            "segm": {k: mask + i for i, k in enumerate(keys)}}


def _fake_run(folder, starts=(0,), last_iter=3, max_iter=4):
    folder.mkdir()
    (folder / "config.yaml").write_text(f"SOLVER:\n  MAX_ITER: {max_iter}\n")
    (folder / "log.txt").write_text("".join(
        f"[..] d2.engine.train_loop INFO: Starting training from iteration {s}\n" for s in starts))
    lines = [{"iteration": 0, "data/invalid_records_skipped": 0.0}]
    for it in range(last_iter + 1):
        lines.append({"iteration": it, "total_loss": 1.0, "time": 0.5 + 0.1 * it})
        if it == 1:
            lines.append({"iteration": it, "bbox/AP": 10.0, "segm/AP": 12.0})
    lines.append({"iteration": max_iter, "bbox/AP": 60.0, "segm/AP": 70.0})
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "demo_summary.json").write_text(json.dumps({
        "metrics": _metrics(60.0, 70.0),
        "seconds": {"dataset": 0.0, "train + evaluate": 300.0, "export": 7.0},
        "total_seconds": 312.0}))
    return folder


def test_reads_the_figures_of_one_whole_run(bench_demo, tmp_path):
    run = bench_demo.read_run(str(_fake_run(tmp_path / "demo")))
    assert run["max_iter"] == 4
    assert run["seconds_per_iteration"] == pytest.approx(0.65)  # median of 0.5 .. 0.8
    assert run["evaluations"] == [{"iterations": 2, "box_AP": 10.0, "mask_AP": 12.0},
                                  {"iterations": 4, "box_AP": 60.0, "mask_AP": 70.0}]
    payload = {"command": "python benchmarks/bench_demo.py", "environment": {"machine": "m"},
               "date": "2026-01-01", "run": run}
    md = bench_demo.render(payload)
    assert "| wall time | 5.2 min (training 4 iterations at 0.65 s/iteration + 2 evaluations: " \
           "300 s, export 7 s) |" in md
    assert "| held-out mask AP (AP50 / AP75) | 70.0 (71.0 / 72.0) |" in md
    assert "| mask / box AP after 2, 4 iterations | 12.0 / 10.0, 70.0 / 60.0 |" in md
    assert "| mask | 70.0 | 71.0 | 72.0 | 73.0 | 74.0 | 75.0 |" in md


def test_refuses_a_resumed_or_unfinished_run(bench_demo, tmp_path):
    with pytest.raises(ValueError, match="resumed run"):
        bench_demo.read_run(str(_fake_run(tmp_path / "resumed", starts=(0, 2))))
    with pytest.raises(ValueError, match="did not reach SOLVER.MAX_ITER 4"):
        bench_demo.read_run(str(_fake_run(tmp_path / "short", last_iter=2)))
    with pytest.raises(ValueError, match="demo_summary.json is missing"):
        bench_demo.read_run(str(tmp_path / "nothing"))
