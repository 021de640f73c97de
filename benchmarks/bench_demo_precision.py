#!/usr/bin/env python
"""
The CPU demo end to end, held-out AP and time: trained in fp32 and with the fast training path,
and the demo's recipe against the one it replaced (the recipe before 2026-12-07), both in fp32.

Each `run` trains the whole demo (`projects/fpn_mask_rcnn/demo.py --fresh`: train, evaluate,
export) in a fresh process with one seed and one variant, and records its box/mask AP, its
end-to-end time and its median training time per iteration:

  fp32         SOLVER.AMP.ENABLED False SOLVER.CHANNELS_LAST False   (Detectron2's fp32 training)
  fast         SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bf16 SOLVER.CHANNELS_LAST True
  before_fp32  fp32, with the previous recipe's keys (BEFORE_RECIPE: 256 px, batch 4, 1000
               iterations, 64 ROIs per image, RPN on p2-p6, evaluation every 250 iterations)

Every other key is the demo config's, evaluation included (MODEL.FAST_INFERENCE as configured,
so both variants evaluate alike). A run takes 10-20 minutes on 2 cores: run one per command
(under `cpulock` on a shared machine); each writes output/bench_demo_precision/<variant>_seed<S>.json.
`report` then compares fast with fp32 over the seeds found (means, per-seed values, the AP
difference paired by seed and the end-to-end time ratio), and the recipe with the one before it
(fp32 runs against before_fp32: end-to-end ratio <= 1/3 and mask AP >= 70 on every seed is the
goal of issue 27), and with --write-results writes
benchmarks/results/bench_demo_precision.{json,md} and the docs' blocks.

  .venv/bin/python benchmarks/bench_demo_precision.py run --variant fp32 --seed 0
  .venv/bin/python benchmarks/bench_demo_precision.py run --variant fast --seed 0
  .venv/bin/python benchmarks/bench_demo_precision.py run --variant before_fp32 --seed 0
  .venv/bin/python benchmarks/bench_demo_precision.py report [--write-results]
"""
import argparse
import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = harness.ROOT
DEMO = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "demo.py")
RUNS_DIR = os.path.join(harness.OUTPUT_DIR, "bench_demo_precision")
NAME = "bench_demo_precision"
# The demo's recipe until 2026-12-07 (configs/Demo at dc04b3c), as overrides of today's keys:
# 256 px images in batches of 4 for 1000 iterations, 64 sampled ROIs per image, the RPN on
# p2-p6, a neck with summed fusion and nearest upsampling, evaluation every 250 iterations on
# 256 px images (tests/benchmarks/test_training_results.py checks it is that config).
BEFORE_RECIPE = [
    "MODEL.FPN.FUSE_TYPE", "sum", "MODEL.FPN.UPSAMPLE_MODE", "nearest",
    "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256",
    "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "256",
    "DATASETS.SHAPES.NUM_TRAIN", "400",
    "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.25",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "100", "SOLVER.STEPS", "(750, 900)",
    "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "500", "TEST.EVAL_PERIOD", "250",
]
FP32 = ["SOLVER.AMP.ENABLED", "False", "SOLVER.CHANNELS_LAST", "False"]
VARIANTS = {
    "fp32": FP32,
    "fast": ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bf16",
             "SOLVER.CHANNELS_LAST", "True"],
    "before_fp32": FP32 + BEFORE_RECIPE,
}
# The acceptance criteria for making the fast path the demo's default.
MAX_MASK_AP_DROP = 1.0
MIN_END_TO_END_SPEEDUP = 1.4
# Issue 27's goal for the recipe: at most a third of the previous recipe's end-to-end time in
# fp32, held-out mask AP >= 70 on every seed.
MAX_RECIPE_TIME_RATIO = 1 / 3
MIN_RECIPE_MASK_AP = 70.0
MIN_RECIPE_SEEDS = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the demo once (one variant, one seed)")
    run.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("opts", nargs=argparse.REMAINDER,
                     help="extra demo overrides (KEY VALUE ...), recorded with the run")
    report = sub.add_parser("report", help="compare the recorded runs")
    harness.add_output_arguments(report)
    return p.parse_args(argv)


def run_path(variant: str, seed: int) -> str:
    return os.path.join(RUNS_DIR, f"{variant}_seed{seed}.json")


def _median_iteration_time(metrics_json: str, skip: int = 20) -> float:
    """Median of Detectron2's per-iteration 'time' records after the first ``skip``
    iterations (warm-up and the first allocations)."""
    times = []
    with open(metrics_json) as f:
        for line in f:
            record = json.loads(line)
            if "time" in record and record.get("iteration", 0) >= skip:
                times.append(record["time"])
    return statistics.median(times) if times else float("nan")


def _iteration_time_windows(metrics_json: str) -> list:
    """``[iteration, seconds]`` for every "time" record of metrics.json (Detectron2 logs the
    median of the last 20 iterations' times every 20 iterations)."""
    windows = []
    with open(metrics_json) as f:
        for line in f:
            record = json.loads(line)
            if "time" in record:
                windows.append([record.get("iteration"), round(record["time"], 4)])
    return windows


def _overall_training_speed(log_txt: str):
    """(iterations, mean seconds per iteration) from Detectron2's "Overall training speed" log
    line. The mean is well above the median (:func:`_median_iteration_time`) when other jobs
    took the cores for a while: then the run's end-to-end time overstates the variant's cost
    by about iterations * (mean - median)."""
    pattern = re.compile(r"Overall training speed: (\d+) iterations in \S+ \(([0-9.]+) s / it\)")
    try:
        with open(log_txt) as f:
            found = pattern.findall(f.read())
    except OSError:
        found = []
    return (int(found[-1][0]), float(found[-1][1])) if found else (0, float("nan"))


def ensure_dataset(opts) -> None:
    """Generate the shapes dataset before the timed run, so no run pays for it."""
    from fpn_plugin.config import load_config
    from fpn_plugin.data.shapes import register_shapes_from_config

    cfg = load_config(os.path.join(ROOT, "configs", "Demo",
                                   "mask_rcnn_R_18_custom_fpn_shapes.yaml"), opts)
    register_shapes_from_config(cfg)  # generates it if missing


def run(args) -> dict:
    overrides = VARIANTS[args.variant] + ["SEED", str(args.seed)] + list(args.opts)
    out = os.path.join(RUNS_DIR, f"{args.variant}_seed{args.seed}")
    os.makedirs(RUNS_DIR, exist_ok=True)
    ensure_dataset(overrides)  # the variant's dataset keys (the recipe before: 400 images)
    command = [sys.executable, DEMO, "--fresh", "--output-dir", out] + overrides
    print(f"[bench] {args.variant}, seed {args.seed}: {' '.join(command)}", flush=True)
    loaded_from = harness.provenance()  # the code the demo process loads: taken before it runs
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)  # the demo prints its own progress and ETA
    wall = time.perf_counter() - start
    # CPU seconds of the demo process (and its data-loader worker): unlike wall time, barely
    # affected when other jobs share the cores.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(out, "demo_summary.json")) as f:
        summary = json.load(f)
    record = {
        "variant": args.variant,
        "seed": args.seed,
        "overrides": overrides,
        "commit": (loaded_from["commit"] or "unknown")[:7],
        "provenance": loaded_from,
        "environment": harness.environment(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "box_AP": summary["box_AP"],
        "mask_AP": summary["mask_AP"],
        "end_to_end_seconds": summary["total_seconds"],
        "stage_seconds": summary["seconds"],
        "process_wall_seconds": round(wall, 1),
        "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "train_seconds_per_iter": _median_iteration_time(
            os.path.join(out, "metrics.json")),
        # the raw timing samples: Detectron2's "time" per 20-iteration window (its median)
        "iteration_time_windows": _iteration_time_windows(os.path.join(out, "metrics.json")),
    }
    _add_training_speed(record, out)
    with open(run_path(args.variant, args.seed), "w") as f:
        json.dump(record, f, indent=1)
    print(f"[bench] {args.variant} seed {args.seed}: mask AP {record['mask_AP']:.2f}, box AP "
          f"{record['box_AP']:.2f}, {record['end_to_end_seconds']:.0f} s end to end, "
          f"{record['train_seconds_per_iter']:.3f} s/iter -> {run_path(args.variant, args.seed)}",
          flush=True)
    return record


def _add_training_speed(record: dict, out_dir: str) -> None:
    iterations, mean = _overall_training_speed(os.path.join(out_dir, "log.txt"))
    record["train_iterations"] = iterations
    record["train_seconds_per_iter_mean"] = mean


def load_runs():
    runs = {}
    for path in sorted(glob.glob(os.path.join(RUNS_DIR, "*_seed*.json"))):
        with open(path) as f:
            record = json.load(f)
        if "train_seconds_per_iter_mean" not in record:  # recorded before it was added
            _add_training_speed(record, path[:-len(".json")])
        runs.setdefault(record["variant"], {})[record["seed"]] = record
    return runs


def contention_seconds(record: dict) -> float:
    """Estimated seconds the run lost to other jobs: iterations * (mean - median) of the
    training iterations (0 when the log has no mean or the mean is not above the median)."""
    mean, median = record.get("train_seconds_per_iter_mean"), record["train_seconds_per_iter"]
    if not record.get("train_iterations") or mean is None or mean != mean:
        return 0.0
    return max(0.0, record["train_iterations"] * (mean - median))


def compare(runs) -> dict:
    """Means per variant, paired (same seed) mask-AP differences, and the speed-ups."""
    fp32, fast = runs.get("fp32", {}), runs.get("fast", {})
    seeds = sorted(set(fp32) & set(fast))
    if not seeds:
        raise SystemExit("report: no seed has both an fp32 and a fast run in "
                         f"{RUNS_DIR}; run `bench_demo_precision.py run` first")

    def mean(variant, key):
        return statistics.mean(variant[s][key] for s in seeds)

    diffs = [fast[s]["mask_AP"] - fp32[s]["mask_AP"] for s in seeds]
    result = {
        "seeds": seeds,
        "mask_AP": {"fp32": mean(fp32, "mask_AP"), "fast": mean(fast, "mask_AP")},
        "box_AP": {"fp32": mean(fp32, "box_AP"), "fast": mean(fast, "box_AP")},
        "mask_AP_difference_per_seed": diffs,
        "mask_AP_difference_mean": statistics.mean(diffs),
        "end_to_end_seconds": {"fp32": mean(fp32, "end_to_end_seconds"),
                               "fast": mean(fast, "end_to_end_seconds")},
        # The same with each run's estimated loss to other jobs taken out (contention_seconds).
        "end_to_end_seconds_uncontended": {
            v: statistics.mean(r[s]["end_to_end_seconds"] - contention_seconds(r[s])
                               for s in seeds) for v, r in (("fp32", fp32), ("fast", fast))},
        "train_seconds_per_iter": {"fp32": mean(fp32, "train_seconds_per_iter"),
                                   "fast": mean(fast, "train_seconds_per_iter")},
        "contended_runs": [f"{v} seed {s}: ~{contention_seconds(r[s]):.0f} s"
                           for v, r in (("fp32", fp32), ("fast", fast)) for s in seeds
                           if contention_seconds(r[s]) > 0.05 * r[s]["end_to_end_seconds"]],
    }
    for key in ("end_to_end_seconds", "end_to_end_seconds_uncontended"):
        result[key.replace("seconds", "speedup")] = result[key]["fp32"] / result[key]["fast"]
    result["train_iter_speedup"] = (result["train_seconds_per_iter"]["fp32"]
                                    / result["train_seconds_per_iter"]["fast"])
    # Every seed within the AP margin, and the time saved whether or not the contention
    # estimate is taken out (the lower of the two ratios counts).
    result["criteria"] = {
        "mask_AP_within": MAX_MASK_AP_DROP,
        "end_to_end_speedup_at_least": MIN_END_TO_END_SPEEDUP,
        "met": bool(min(diffs) >= -MAX_MASK_AP_DROP
                    and min(result["end_to_end_speedup"], result["end_to_end_speedup_uncontended"])
                    >= MIN_END_TO_END_SPEEDUP),
    }
    return result


def compare_recipes(runs):
    """Today's recipe in fp32 (the ``fp32`` runs, every seed) against the one before it
    (``before_fp32``): end-to-end time ratio of the means (the larger of the measured and the
    contention-corrected ratio counts), mask AP per seed, and issue 27's criteria. None when
    either side has no run."""
    now, before = runs.get("fp32", {}), runs.get("before_fp32", {})
    if not now or not before:
        return None

    def seconds(side, corrected):
        return statistics.mean(r["end_to_end_seconds"]
                               - (contention_seconds(r) if corrected else 0)
                               for r in side.values())

    measured = {"before": seconds(before, False), "now": seconds(now, False)}
    uncontended = {"before": seconds(before, True), "now": seconds(now, True)}
    ratios = [t["now"] / t["before"] for t in (measured, uncontended)]
    mask = [now[s]["mask_AP"] for s in sorted(now)]
    result = {
        "seeds": sorted(now),
        "before_seeds": sorted(before),
        "end_to_end_seconds": measured,
        "end_to_end_seconds_uncontended": uncontended,
        "time_ratio": ratios[0],
        "time_ratio_uncontended": ratios[1],
        "train_seconds_per_iter": {
            side: statistics.mean(r["train_seconds_per_iter"] for r in runs_.values())
            for side, runs_ in (("before", before), ("now", now))},
        "mask_AP_per_seed": mask,
        "box_AP_per_seed": [now[s]["box_AP"] for s in sorted(now)],
        "mask_AP_mean": statistics.mean(mask),
        "mask_AP_stdev": statistics.stdev(mask) if len(mask) > 1 else float("nan"),
        "mask_AP_before": statistics.mean(r["mask_AP"] for r in before.values()),
    }
    result["criteria"] = {
        "time_ratio_at_most": MAX_RECIPE_TIME_RATIO,
        "mask_AP_at_least": MIN_RECIPE_MASK_AP,
        "seeds_at_least": MIN_RECIPE_SEEDS,
        "met": bool(max(ratios) <= MAX_RECIPE_TIME_RATIO and len(mask) >= MIN_RECIPE_SEEDS
                    and min(mask) >= MIN_RECIPE_MASK_AP),
    }
    return result


def recipe_markdown(recipes) -> List[str]:
    if recipes is None:
        return ["Recipe comparison: no `before_fp32` run recorded (run it with "
                "`run --variant before_fp32 --seed 0`)."]
    seconds, uncontended = recipes["end_to_end_seconds"], recipes["end_to_end_seconds_uncontended"]
    per_seed = ", ".join(f"{m:.2f}" for m in recipes["mask_AP_per_seed"])
    box = ", ".join(f"{b:.2f}" for b in recipes["box_AP_per_seed"])
    met = recipes["criteria"]["met"]
    return [
        f"**The recipe against the one before it, both in fp32**: end to end "
        f"{seconds['now']:.0f} s (mean of seeds {recipes['seeds']}) against "
        f"{seconds['before']:.0f} s "
        f"(seeds {recipes['before_seeds']}): **ratio {recipes['time_ratio']:.3f}** "
        f"({recipes['time_ratio_uncontended']:.3f} with the time lost to other jobs taken out: "
        f"{uncontended['now']:.0f} s vs {uncontended['before']:.0f} s); training "
        f"{recipes['train_seconds_per_iter']['now']:.3f} s/iter against "
        f"{recipes['train_seconds_per_iter']['before']:.3f}. Held-out mask AP per seed {per_seed} "
        f"(mean {recipes['mask_AP_mean']:.2f}, standard deviation {recipes['mask_AP_stdev']:.2f}; "
        f"the recipe before: {recipes['mask_AP_before']:.2f}); box AP {box}.",
        "",
        f"Criteria (issue 27: end to end at most {recipes['criteria']['time_ratio_at_most']:.3f} of "
        f"the recipe before by both ratios, mask AP >= {MIN_RECIPE_MASK_AP:.0f} on each of at "
        f"least {MIN_RECIPE_SEEDS} seeds): **{'met' if met else 'NOT met'}**.",
    ]


def markdown(runs, result, recipes=None) -> str:
    seeds = result["seeds"]
    lines = [
        "| variant | seed | mask AP | box AP | end to end | training s/iter (median / mean) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in ("fp32", "fast", "before_fp32"):
        for s in sorted(runs.get(variant, {})):
            r = runs[variant][s]
            lines.append(f"| {variant} | {s} | {r['mask_AP']:.2f} | {r['box_AP']:.2f} | "
                         f"{r['end_to_end_seconds']:.0f} s | {r['train_seconds_per_iter']:.3f} / "
                         f"{r.get('train_seconds_per_iter_mean', float('nan')):.3f} |")
    diffs = ", ".join(f"{d:+.2f}" for d in result["mask_AP_difference_per_seed"])
    uncontended = result["end_to_end_seconds_uncontended"]
    contended = result["contended_runs"]
    lines += [
        "",
        f"Means over seeds {seeds}: mask AP fp32 {result['mask_AP']['fp32']:.2f}, fast "
        f"{result['mask_AP']['fast']:.2f} (fast - fp32 per seed: {diffs}; mean "
        f"{result['mask_AP_difference_mean']:+.2f}); box AP fp32 {result['box_AP']['fp32']:.2f}, "
        f"fast {result['box_AP']['fast']:.2f}. End to end fp32 "
        f"{result['end_to_end_seconds']['fp32']:.0f} s, fast "
        f"{result['end_to_end_seconds']['fast']:.0f} s: **{result['end_to_end_speedup']:.2f}x** "
        f"shorter ({result['end_to_end_speedup_uncontended']:.2f}x with the time lost to other "
        f"jobs taken out: {uncontended['fp32']:.0f} s vs {uncontended['fast']:.0f} s); training "
        f"iterations {result['train_iter_speedup']:.2f}x faster (medians). Runs slowed by other "
        f"jobs (mean iteration time well above the median): "
        f"{'; '.join(contended) if contended else 'none'}.",
        "",
        f"Criteria (mask AP of every seed within {MAX_MASK_AP_DROP} of fp32's, end to end >= "
        f"{MIN_END_TO_END_SPEEDUP}x shorter by both ratios): "
        f"**{'met' if result['criteria']['met'] else 'NOT met'}**.",
        "",
        *recipe_markdown(recipes),
        "",
        "`fast` = `SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bf16 SOLVER.CHANNELS_LAST True`; "
        "`fp32` = both off; `before_fp32` = fp32 with the recipe before 2026-12-07 "
        "(`BEFORE_RECIPE` in the script). End to end = the demo's `total_seconds` (train, its "
        "evaluations and the export; the dataset already generated); training s/iter: median of "
        "Detectron2's per-iteration `time` after iteration 20 / Detectron2's overall mean; time "
        "lost to other jobs = iterations x (mean - median).",
    ]
    return "\n".join(lines)


def render(payload):
    """The markdown of a results payload (what ``report`` writes as ``bench_demo_precision.json``):
    the header, the per-run table, the comparison and the verdict."""
    runs = {v: {int(s): r for s, r in by_seed.items()} for v, by_seed in payload["runs"].items()}
    result = payload["comparison"]
    variants = ", ".join(v for v in VARIANTS if v in runs)
    seeds = sorted({s for r in runs.values() for s in r})
    header = (f"Command: `python benchmarks/bench_demo_precision.py run --variant V --seed S` "
              f"for V in {variants} and S in {seeds}, then `report --write-results`  \n"
              "Machine: " + ", ".join(f"{k} {v}" for k, v in payload["environment"].items())
              + "  \n" + f"Date: {payload['date']} (commits of the runs: {payload['commits']})\n\n")
    return header + markdown(runs, result, payload.get("recipes")) + "\n"


def oldest_run_provenance(runs) -> dict:
    """The result's provenance is its oldest run's (the code the first run loaded): the result
    is stale once the measured code changed after ANY of its runs, not only after the report."""
    oldest = min((r for by_seed in runs.values() for r in by_seed.values()),
                 key=lambda r: r["date"])
    provenance = dict(oldest.get("provenance") or {"commit": oldest["commit"]})
    # a run's provenance was taken when it started; only runs recorded before they carried
    # one get their (end) date
    provenance.setdefault("measured_at", oldest["date"])
    return provenance


def report(args) -> str:
    runs = load_runs()
    result = compare(runs)
    first = runs["fp32"][result["seeds"][0]]
    payload = {
        "command": "python benchmarks/bench_demo_precision.py report --write-results",
        "environment": first["environment"],
        "date": time.strftime("%Y-%m-%d"),
        "commits": sorted({r["commit"] for v in runs.values() for r in v.values()}),
        "runs": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in runs.items()},
        "comparison": result,
        "recipes": compare_recipes(runs),
        "provenance": oldest_run_provenance(runs),
    }
    text = render(payload)
    print(text)
    harness.write_payload(NAME, payload, text, write_results=args.write_results)
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
