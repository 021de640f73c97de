"""Every result file says when, from what code and where it was measured, and none is shown as
current while the code it measures changed after it: such a file carries a ``stale`` reason,
which its rendered markdown (and every README/docs block quoting it) opens with
(tests/benchmarks/test_results.py checks the rendering). ``python benchmarks/harness.py
--mark-stale`` sets the reasons; re-running the benchmark clears it."""
import glob
import importlib.util
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
NAMES = sorted(os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(RESULTS, "*.json")))


def _git(*args):
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


pytestmark = pytest.mark.skipif(_git("rev-parse", "HEAD") is None,
                                reason="needs the git history (a checkout, not an export)")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location(
        "bench_harness_for_provenance", os.path.join(ROOT, "benchmarks", "harness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_result_lists_the_code_it_measures(harness):
    assert sorted(harness.MEASURED_PATHS) == NAMES
    for name in NAMES:
        for path in harness.measured_paths(name):
            assert os.path.exists(os.path.join(ROOT, path)), (name, path)


@pytest.mark.parametrize("name", NAMES)
def test_result_is_current_or_marked_stale(name, harness):
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        payload = json.load(f)
    reason = harness.staleness(name, payload)
    if reason is None:
        assert "stale" not in payload, f"{name} is current but marked stale: --mark-stale"
        prov = payload["provenance"]
        assert prov["commit"] and prov["dirty"] is not None and prov["cpu_flags"]
    else:
        assert payload.get("stale"), (
            f"{name}.json is shown as current but {reason}: re-run it, or mark it "
            "(python benchmarks/harness.py --mark-stale)")
        with open(os.path.join(RESULTS, f"{name}.md")) as f:
            assert f.read().startswith("**Stale, re-run pending**")


def test_staleness_compares_the_recorded_commit_with_the_last_change(harness):
    paths = harness.measured_paths("bench_rpn")
    last = _git("log", "-1", "--format=%H", "--", *paths)
    before = _git("rev-parse", f"{last}^")
    assert harness.staleness("bench_rpn", {"provenance": {"commit": last}}) is None
    assert harness.staleness("bench_rpn", {"provenance": {"commit": _git("rev-parse", "HEAD")}}) \
        is None
    assert "changed after it" in harness.staleness("bench_rpn",
                                                   {"provenance": {"commit": before}})
    assert "before results recorded" in harness.staleness("bench_rpn", {"date": "2026-11-22"})


def test_new_results_record_provenance_and_raw_samples(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "OUTPUT_DIR", str(tmp_path))
    row = {"name": "x", "unit": "s", "result": harness.compare(lambda: None, lambda: None,
                                                                 warmup=0, repeats=3)}
    harness.save("provenance_probe", [row], "python benchmarks/bench_rpn.py")
    with open(tmp_path / "provenance_probe.json") as f:
        payload = json.load(f)
    prov = payload["provenance"]
    assert prov["commit"] == _git("rev-parse", "HEAD")
    assert isinstance(prov["dirty"], bool) and prov["cpu_flags"] and prov["measured_at"]
    assert {"machine", "cpu", "torch", "detectron2", "python"} <= set(payload["environment"])
    assert len(payload["rows"][0]["result"]["a"]["raw"]) == 3
    assert "stale" not in payload
