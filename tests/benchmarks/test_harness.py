"""The benchmark harness measures what it claims (peak memory, ABBA timing, result files)."""
import glob
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location(
        "bench_harness", os.path.join(ROOT, "benchmarks", "harness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MIB = 2 ** 20


def test_peak_memory_counts_live_tensors_not_freed_ones(harness):
    def sequential():  # 8 MiB, freed, then 4 MiB: peak 8 MiB
        a = torch.ones(8 * MIB, dtype=torch.uint8)
        del a
        b = torch.ones(4 * MIB, dtype=torch.uint8)
        return b.sum()

    def overlapping():  # 8 MiB and 4 MiB alive together: peak 12 MiB
        a = torch.ones(8 * MIB, dtype=torch.uint8)
        b = torch.ones(4 * MIB, dtype=torch.uint8)
        return a.sum() + b.sum()

    seq, ovl = harness.peak_memory(sequential), harness.peak_memory(overlapping)
    # Exact up to the few bytes of the scalar results.
    assert 8 * MIB <= seq < 8 * MIB + 4096
    assert 12 * MIB <= ovl < 12 * MIB + 4096
    result = harness.compare_memory(sequential, overlapping)
    assert result["ratio"] == pytest.approx(8 / 12, rel=1e-3)


def test_compare_times_both_sides_in_abba_order(harness, monkeypatch):
    """ABBA order, and each call timed on its own. A fake clock stands in for the wall clock
    (no test asserts on real time): a call of A takes 4 ticks, of B 2 ticks, plus a drift
    that grows with every call, which ABBA spreads over both sides."""
    now = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    calls = []

    def a():
        calls.append("a")
        now[0] += 4.0 + 0.1 * len(calls)

    def b():
        calls.append("b")
        now[0] += 2.0 + 0.1 * len(calls)

    result = harness.compare(a, b, warmup=1, repeats=4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    # Timed calls 3..10: A at 3, 6, 7, 10 (4.3, 4.6, 4.7, 5.0 ticks), B at 4, 5, 8, 9 (2.4,
    # 2.5, 2.8, 2.9): each call's own span, nothing of its neighbours.
    assert result["a"].samples == result["b"].samples == 4
    assert result["a"].median == pytest.approx(4.65)
    assert result["b"].median == pytest.approx(2.65)
    assert result["a"].minimum == pytest.approx(4.3)
    assert result["b"].minimum == pytest.approx(2.4)
    assert result["ratio"] == pytest.approx(4.65 / 2.65)


def test_save_writes_markdown_and_json_with_labels(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "OUTPUT_DIR", str(tmp_path))
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "tracked"))
    monkeypatch.setattr(harness, "README", str(tmp_path / "README.md"))
    timing = {"a": harness.Timing.of([1.0, 2.0, 3.0]), "b": harness.Timing.of([2.0, 4.0, 6.0]),
              "ratio": 0.5}
    rows = [{"name": "x time", "unit": "s", "result": timing},
            {"name": "x peak memory", "unit": "MiB", "result": {"a": MIB, "b": 2 * MIB, "ratio": 0.5}}]
    md = harness.save("unit", rows, "cmd --flag", labels=("fast", "slow"), notes="note line")
    assert "| fast (median) | slow (median) |" in md
    assert "| x time | 2000.0 ms | 4000.0 ms | 0.500 |" in md
    assert "| x peak memory | 1.0 MiB | 2.0 MiB | 0.500 | exact |" in md
    assert md.rstrip().endswith("note line")
    payload = json.loads((tmp_path / "unit.json").read_text())
    assert payload["command"] == "cmd --flag"
    assert payload["labels"] == ["fast", "slow"]
    assert payload["rows"][0]["result"]["a"]["median"] == 2.0
    assert (tmp_path / "unit.md").read_text() == md
    assert not (tmp_path / "tracked").exists() and not (tmp_path / "README.md").exists()


def test_tracked_results_and_readme_are_written_only_when_asked(harness, tmp_path, monkeypatch):
    """A benchmark run leaves the checkout clean unless --write-results asks otherwise."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:unit -->\nold\n<!-- /bench:unit -->\n")
    monkeypatch.setattr(harness, "OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "tracked"))
    monkeypatch.setattr(harness, "README", str(readme))
    monkeypatch.setattr(harness, "environment", lambda: {"machine": "test"})
    rows = [{"name": "x peak memory", "unit": "MiB", "result": {"a": MIB, "b": MIB, "ratio": 1.0}}]
    harness.save("unit", rows, "cmd")
    assert sorted(os.listdir(tmp_path / "output")) == ["unit.json", "unit.md"]
    assert not (tmp_path / "tracked").exists() and "old" in readme.read_text()
    harness.save("unit", rows, "cmd", write_results=True)
    assert sorted(os.listdir(tmp_path / "tracked")) == ["unit.json", "unit.md"]
    assert "old" not in readme.read_text() and "x peak memory" in readme.read_text()


SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


def test_the_benchmark_scripts_are_found():
    assert {"bench_models.py", "bench_rpn.py", "bench_fast_path.py", "bench_demo.py",
            "bench_export.py", "bench_mask_heads.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_has_the_write_results_flag(script):
    source = open(os.path.join(ROOT, "benchmarks", script)).read()
    assert "add_output_arguments(" in source and "args.write_results" in source


def test_render_reproduces_the_markdown_from_the_json(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "OUTPUT_DIR", str(tmp_path))
    timing = {"a": harness.Timing.of([1.0, 2.0, 3.0]), "b": harness.Timing.of([2.0, 4.0, 6.0]),
              "ratio": 0.5}
    rows = [{"name": "x time", "unit": "s", "result": timing}]
    md = harness.save("unit", rows, "python benchmarks/x.py", notes="| a | b |\n|---|---|")
    payload = json.loads((tmp_path / "unit.json").read_text())
    assert harness.render(payload) == md == (tmp_path / "unit.md").read_text()
    assert payload["date"] and payload["notes"] == "| a | b |\n|---|---|"


def test_tracked_results_rewrite_the_blocks_of_readme_and_docs(harness, tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    for page in ("README.md", "docs/a.md", "docs/b.md"):
        (tmp_path / page).write_text(f"{page}\n<!-- bench:unit -->\nold\n<!-- /bench:unit -->\n")
    (tmp_path / "docs" / "c.md").write_text("no block\n")
    monkeypatch.setattr(harness, "README", str(tmp_path / "README.md"))
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "results"))
    harness.write_payload("unit", {"x": 1}, "| new |\n", write_results=True)
    for page in ("README.md", "docs/a.md", "docs/b.md"):
        assert (tmp_path / page).read_text() == (
            f"{page}\n<!-- bench:unit -->\n| new |\n<!-- /bench:unit -->\n")
    assert (tmp_path / "docs" / "c.md").read_text() == "no block\n"
    # A block added later is filled from the results file.
    (tmp_path / "docs" / "c.md").write_text("<!-- bench:unit -->\n<!-- /bench:unit -->\n")
    assert harness.refresh_blocks() == ["docs/c.md: unit"]
    assert (tmp_path / "docs" / "c.md").read_text() == (
        "<!-- bench:unit -->\n| new |\n<!-- /bench:unit -->\n")


def test_update_readme_block_replaces_only_its_own_block(harness, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\n"
                      "<!-- bench:b -->\nold b\n<!-- /bench:b -->\nend\n")
    assert harness.update_readme_block(str(readme), "a", "| new | table |\n")
    assert readme.read_text() == ("intro\n<!-- bench:a -->\n| new | table |\n<!-- /bench:a -->\n"
                                  "<!-- bench:b -->\nold b\n<!-- /bench:b -->\nend\n")
    before = readme.read_text()
    assert not harness.update_readme_block(str(readme), "missing", "x")
    assert readme.read_text() == before
