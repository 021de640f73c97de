"""
Timing and memory harness shared by the benchmark scripts.

Every comparison runs the plugin's component (A) and Detectron2's built-in (B) in one process,
on the same inputs and weights, after warm-up, alternating the two in ABBA order so slow drifts
(thermal, other load) hit both equally. Reported figures are medians with the interquartile
range; ratios are A/B (below 1.0 means the plugin is faster or leaner).
"""
import glob
import json
import os
import platform
import re
import statistics
import time
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tracked results (and README's tables): written only with --write-results.
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
# Where a run writes by default (ignored by git), so running a benchmark never dirties the checkout.
OUTPUT_DIR = os.path.join(ROOT, "output", "benchmarks")

# The profiler logs CUDA probing errors ("gpuGetDeviceCount failed") on CPU-only machines.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def add_output_arguments(parser) -> None:
    """The options every benchmark script shares: where its results go."""
    parser.add_argument(
        "--write-results", action="store_true",
        help="write the results into the tracked benchmarks/results/ and README.md's table "
             f"(default: only {os.path.relpath(OUTPUT_DIR, ROOT)}/, the checkout stays clean)")


@dataclass
class Timing:
    median: float
    q1: float
    q3: float
    minimum: float
    samples: int
    raw: List[float] = field(default_factory=list)  # every repeat's seconds, in order

    @classmethod
    def of(cls, seconds: List[float]) -> "Timing":
        qs = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
        return cls(statistics.median(seconds), qs[0], qs[2], min(seconds), len(seconds),
                   list(seconds))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median else 0.0


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def compare(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    warmup: int = 3,
    repeats: int = 15,
    device: str = "cpu",
) -> Dict[str, object]:
    """
    Time two callables alternately.

    Args:
        fn_a, fn_b: zero-argument callables doing one unit of work each (A = plugin,
            B = Detectron2 built-in).
        warmup: untimed calls of each before measuring.
        repeats: timed calls of each (in ABBA order).
        device: "cpu" or a CUDA device; CUDA work is synchronised around every call.

    Returns:
        dict with "a" and "b" (:class:`Timing`) and "ratio" (median A / median B).
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a: List[float] = []
    times_b: List[float] = []
    for i in range(repeats):
        order = ((fn_a, times_a), (fn_b, times_b))
        for fn, sink in order if i % 2 == 0 else reversed(order):
            sink.append(_timed(fn, device))
    a, b = Timing.of(times_a), Timing.of(times_b)
    return {"a": a, "b": b, "ratio": a.median / b.median}


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """
    Peak bytes of tensor memory allocated while ``fn`` runs, above what was allocated before.

    CUDA: the caching allocator's peak statistics. CPU: PyTorch's profiler records every
    tensor allocation and free; replaying them in time order gives the exact peak of live
    tensor bytes (the allocator has no peak counter on CPU, and process RSS is too coarse).
    """
    if str(device).startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        # Allocations are attributed to the op that made them ("self" memory); frees that
        # happen outside any op appear as "[memory]" events with negative sizes.
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def compare_memory(fn_a, fn_b, device: str = "cpu") -> Dict[str, object]:
    """Peak memory of A and B (one warm call each first), and the ratio A/B."""
    fn_a()
    fn_b()
    a, b = peak_memory(fn_a, device), peak_memory(fn_b, device)
    return {"a": a, "b": b, "ratio": a / b if b else float("nan")}


def environment() -> Dict[str, str]:
    import detectron2
    import torchvision

    info = {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# CPU features that change kernel choice (oneDNN's AVX-512/AMX paths, bf16 support).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in _CPU_FLAGS if flag in have) or "none"
    except OSError:
        pass
    return "unknown"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> Dict[str, object]:
    """When and from what code a result was measured: the date and time (UTC), the commit and
    whether the tree had uncommitted changes, the machine with its CPU flags."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "hostname": platform.node(),
        "cpu_flags": cpu_flags(),
    }


# The files whose code each result measures: a result is stale when any of them changed after
# the commit it records (tests/benchmarks/test_provenance.py). Each benchmark's script is
# measured too, and configs/Demo wherever a benchmark builds the demo's model.
MEASURED_PATHS = {
    "bench_cpu_kinds": ["fpn_plugin/inference", "fpn_plugin/utils/precision.py", "fpn_plugin/neck",
                        "fpn_plugin/rpn", "fpn_plugin/mask_head", "configs/Demo"],
    "bench_demo": ["fpn_plugin", "projects/fpn_mask_rcnn/demo.py", "configs/Demo"],
    # whole demo trainings: every part of the plugin the demo runs
    "bench_demo_precision": ["fpn_plugin", "projects/fpn_mask_rcnn/demo.py", "configs/Demo"],
    "bench_deploy": ["fpn_plugin/deploy", "fpn_plugin/neck", "fpn_plugin/rpn",
                     "fpn_plugin/mask_head", "fpn_plugin/inference"],
    "bench_export": ["fpn_plugin/export", "fpn_plugin/evaluation", "configs/Demo"],
    "bench_fast_path": ["fpn_plugin/inference", "fpn_plugin/neck", "fpn_plugin/rpn",
                        "configs/Demo"],
    "bench_mask_heads_timing": ["fpn_plugin/mask_head", "fpn_plugin/layers"],
    "bench_rpn": ["fpn_plugin/rpn"],
    "bench_variants": ["fpn_plugin/neck", "fpn_plugin/rpn", "fpn_plugin/mask_head",
                       "fpn_plugin/layers", "fpn_plugin/engine", "fpn_plugin/data"],
    "models_cpu": ["fpn_plugin/neck", "fpn_plugin/rpn", "fpn_plugin/mask_head",
                   "fpn_plugin/layers"],
    "train_cpu": ["fpn_plugin/engine", "fpn_plugin/neck", "fpn_plugin/rpn",
                  "fpn_plugin/mask_head", "fpn_plugin/layers", "configs/Demo"],
}
_SCRIPT_OF = {"models_cpu": "bench_models", "train_cpu": "bench_train",
              "bench_mask_heads_timing": "bench_mask_heads"}


def measured_paths(name: str) -> List[str]:
    script = f"benchmarks/{_SCRIPT_OF.get(name, name)}.py"
    return MEASURED_PATHS[name] + [script, "benchmarks/harness.py"]


def staleness(name: str, payload: Dict[str, object]) -> Optional[str]:
    """Why ``payload`` (results ``name``) no longer measures the current code, or None. Raises
    RuntimeError where git cannot tell (no repository)."""
    last = _git("log", "-1", "--format=%H", "--", *measured_paths(name))
    if not last:
        raise RuntimeError("no git history to compare the results' commit with")
    commit = (payload.get("provenance") or {}).get("commit")
    if not commit:
        return (f"measured on {payload.get('date')} before results recorded their commit; the "
                f"code it measures last changed in {last[:10]}")
    if _git("merge-base", "--is-ancestor", last, commit) is None:
        return (f"measured at {commit[:10]}; the code it measures changed after it "
                f"({last[:10]})")
    return None


def stale_banner(payload: Dict[str, object]) -> str:
    """The line a stale result's markdown starts with (empty for a current one)."""
    reason = payload.get("stale")
    return (f"**Stale, re-run pending**: {reason}. Re-run: `{payload['command']}`.\n\n"
            if reason else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_rows(rows: List[Dict[str, object]],
                labels: Tuple[str, str] = ("plugin", "Detectron2")) -> str:
    """
    Markdown table of benchmark rows. Each row: name, unit ("s" or "MiB"), and the
    ``compare``/``compare_memory`` result under "result". ``labels`` name A and B.
    """
    a_name, b_name = labels
    lines = [
        f"| benchmark | {a_name} (median) | {b_name} (median) | ratio A/B | spread (IQR/median) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        res = row["result"]
        if row["unit"] == "s":
            a, b = res["a"], res["b"]
            lines.append(
                f"| {row['name']} | {a.median * 1e3:.1f} ms | {b.median * 1e3:.1f} ms | "
                f"{res['ratio']:.3f} | {a.spread:.1%} / {b.spread:.1%} |"
            )
        else:
            lines.append(
                f"| {row['name']} | {res['a'] / 2**20:.1f} MiB | {res['b'] / 2**20:.1f} MiB | "
                f"{res['ratio']:.3f} | exact |"
            )
    return "\n".join(lines)


def render(payload: Dict[str, object]) -> str:
    """
    The markdown of a results payload (what ``save`` writes as ``<name>.json``): the command,
    machine and date, the table of its rows and its notes. ``save`` writes exactly this as
    ``<name>.md`` and into the README/docs blocks, so the tracked tables can be checked
    against the JSON (``tests/benchmarks/test_results.py``).
    """
    env = payload["environment"]
    header = (
        f"Command: `{payload['command']}`  \n"
        + "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  \n"
        + f"Date: {payload['date']}\n\n"
    )
    rows = []
    for row in payload["rows"]:
        result = dict(row["result"])
        if row["unit"] == "s":
            result["a"], result["b"] = (
                r if isinstance(r, Timing) else Timing(**r) for r in (result["a"], result["b"]))
        rows.append({**row, "result": result})
    notes = payload.get("notes", "")
    return header + format_rows(rows, tuple(payload["labels"])) + "\n" + (
        f"\n{notes}\n" if notes else "")


def save(name: str, rows: List[Dict[str, object]], command: str,
         extra: Optional[Dict[str, object]] = None,
         labels: Tuple[str, str] = ("plugin", "Detectron2"), notes: str = "",
         write_results: bool = False) -> str:
    """
    Write rows as JSON and markdown to ``output/benchmarks/<name>.{json,md}``; return the md.
    ``labels`` name A and B in the table; ``notes`` (markdown) follows it. With
    ``write_results`` (the scripts' ``--write-results``) they go to the tracked
    ``benchmarks/results/`` instead and every ``<!-- bench:<name> -->`` block of README.md and
    docs/*.md is replaced by the same markdown.
    """
    def plain(obj):
        return asdict(obj) if isinstance(obj, Timing) else obj

    payload = {
        "command": command,
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d"),
        "labels": list(labels),
        "rows": [{**r, "result": {k: plain(v) for k, v in r["result"].items()}} for r in rows],
        "notes": notes,
        **(extra or {}),
    }
    return write_payload(name, payload, render(payload), write_results)


def write_payload(name: str, payload: Dict[str, object], markdown: str,
                  write_results: bool = False, measured_now: bool = True,
                  indent: int = 2) -> str:
    """
    Write ``payload`` as ``<name>.json`` and ``markdown`` (its rendering) as ``<name>.md`` to
    ``output/benchmarks/``, or with ``write_results`` to the tracked ``benchmarks/results/``
    and the ``<!-- bench:<name> -->`` blocks of README.md and docs/*.md. Returns the markdown.
    Scripts with their own table format call this with their own ``render(payload)``.
    """
    if measured_now:  # a re-render of an old result keeps the provenance it has (or none)
        payload.setdefault("provenance", provenance())
    markdown = stale_banner(payload) + markdown
    folder = RESULTS_DIR if write_results else OUTPUT_DIR
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=indent)
        f.write("\n")
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(markdown)
    updated = []
    if write_results:
        updated = [os.path.relpath(doc, ROOT) for doc in markdown_files()
                   if update_readme_block(doc, name, markdown)]
    print(f"[bench] results written to {os.path.join(folder, name)}.{{md,json}}"
          + (f" and {', '.join(updated) or 'no README/docs block'}" if write_results
             else " (--write-results: into the tracked files)"), flush=True)
    return markdown


def markdown_files() -> List[str]:
    """README.md and docs/*.md: where ``<!-- bench:NAME -->`` blocks may quote results."""
    docs = os.path.join(os.path.dirname(README), "docs")
    names = sorted(f for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return [README] + [os.path.join(docs, f) for f in names]


def update_readme_block(readme: str, name: str, markdown: str) -> bool:
    """
    Replace the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in a markdown
    file (README.md or a docs page) with ``markdown`` (so its tables are the scripts' own
    output). Returns whether the file has that block; without one nothing is written.
    """
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if not os.path.isfile(readme):
        return False
    with open(readme) as f:
        text = f.read()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return False
    text = text[: i + len(begin)] + "\n" + markdown.rstrip("\n") + "\n" + text[j:]
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)
    return True


def refresh_blocks() -> List[str]:
    """
    Rewrite every ``<!-- bench:NAME -->`` block of README.md and docs/*.md from the tracked
    ``benchmarks/results/NAME.md`` (for a block just added to a page); returns what changed
    and which blocks have no results file yet.
    """
    changed = []
    for doc in markdown_files():
        with open(doc) as f:
            names = re.findall(r"<!-- bench:([\w.-]+) -->", f.read())
        for name in names:
            path = os.path.join(RESULTS_DIR, f"{name}.md")
            if not os.path.isfile(path):
                changed.append(f"{os.path.relpath(doc, os.path.dirname(README))}: {name} has no "
                               "results file yet")
                continue
            with open(doc) as f:
                before = f.read()
            with open(path) as f:
                update_readme_block(doc, name, f.read())
            with open(doc) as f:
                if f.read() != before:
                    changed.append(f"{os.path.relpath(doc, os.path.dirname(README))}: {name}")
    return changed


def mark_stale_results() -> List[str]:
    """Sets (or clears) every tracked result's ``stale`` reason from git and re-renders it
    (its .md and its README/docs blocks), so a stale figure says so where it is shown.
    Returns the names of the stale results."""
    import importlib.util

    stale = []
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            text = f.read()
        payload = json.loads(text)
        lines = text.splitlines()
        indent = len(lines[1]) - len(lines[1].lstrip(" ")) if len(lines) > 1 else 2
        reason = staleness(name, payload)
        if reason == payload.get("stale"):
            continue
        payload.pop("stale", None)
        if reason:
            payload["stale"] = reason
            stale.append(name)
        if isinstance(payload.get("rows"), list) and "labels" in payload:
            markdown = render(payload)
        else:
            script = os.path.join(ROOT, "benchmarks", f"{_SCRIPT_OF.get(name, name)}.py")
            spec = importlib.util.spec_from_file_location(f"_render_{name}", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            markdown = module.render(payload)
        write_payload(name, payload, markdown, write_results=True, measured_now=False,
                      indent=indent or 2)
    return stale


if __name__ == "__main__":
    # `python benchmarks/harness.py`: the README/docs blocks from the tracked results files;
    # `--mark-stale`: after code changes (or a merge), first mark the tracked results that
    # predate the code they measure (and re-render them).
    import sys

    if sys.argv[1:] not in ([], ["--mark-stale"]):
        sys.exit("usage: python benchmarks/harness.py [--mark-stale]")
    if sys.argv[1:] == ["--mark-stale"]:
        print("stale:", ", ".join(mark_stale_results()) or "none")
    for line in refresh_blocks() or ["every block already equals its results file"]:
        print(line)
