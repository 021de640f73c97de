#!/usr/bin/env python
"""
The demo's figures as a results file: reads a finished `make demo` run (its own
``demo_summary.json``, ``metrics.json`` and ``log.txt``) and writes ``bench_demo.{json,md}``
with the wall time of each stage, the seconds per training iteration, the held-out box and mask
AP at every evaluation and the final COCO metrics. It trains nothing itself:

    make demo DEMO_ARGS=--fresh        # the measurement (minutes; resumes without --fresh)
    .venv/bin/python benchmarks/bench_demo.py [--output-dir output/demo] [--write-results]

A run that resumed from a checkpoint, or did not reach its last iteration, is refused: its
times would not be those of one whole run.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "demo"),
                   help="the demo's output folder (default: output/demo)")
    harness.add_output_arguments(p)
    return p.parse_args(argv)


def read_run(output_dir):
    """The figures of one whole demo run in ``output_dir``; ValueError if it is not one."""
    def path(name):
        return os.path.join(output_dir, name)

    for name in ("demo_summary.json", "metrics.json", "log.txt", "config.yaml"):
        if not os.path.isfile(path(name)):
            raise ValueError(f"{path(name)} is missing: run `make demo DEMO_ARGS=--fresh` first")
    with open(path("demo_summary.json")) as f:
        summary = json.load(f)
    with open(path("log.txt")) as f:
        starts = re.findall(r"Starting training from iteration (\d+)", f.read())
    if starts != ["0"]:
        raise ValueError(f"{output_dir} holds a resumed run (training started at iterations "
                         f"{starts}); its times are not one run's: use `make demo DEMO_ARGS=--fresh`")
    with open(path("config.yaml")) as f:
        max_iter = int(re.search(r"^  MAX_ITER: (\d+)$", f.read(), re.M).group(1))
    records = []
    with open(path("metrics.json")) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    iterations = [r["iteration"] for r in records if "total_loss" in r]
    if not iterations or iterations[-1] != max_iter - 1:
        raise ValueError(f"{output_dir}: training did not reach SOLVER.MAX_ITER {max_iter}")
    evaluations = [
        {"iterations": min(r["iteration"] + 1, max_iter),
         "box_AP": r["bbox/AP"], "mask_AP": r["segm/AP"]}
        for r in records if "segm/AP" in r
    ]
    return {
        "max_iter": max_iter,
        # Detectron2 logs each iteration time as the median of the last 20.
        "seconds_per_iteration": statistics.median(r["time"] for r in records if "time" in r),
        "seconds": summary["seconds"],
        "total_seconds": summary["total_seconds"],
        "evaluations": evaluations,
        "metrics": {task: {k: summary["metrics"][task][k] for k in METRICS}
                    for task in ("bbox", "segm")},
        "run_date": time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(
            path("demo_summary.json")))),
    }


def render(payload):
    """The markdown of a bench_demo payload."""
    env, run = payload["environment"], payload["run"]
    seconds = run["seconds"]
    final = {task: run["metrics"][task] for task in ("bbox", "segm")}
    evaluations = run["evaluations"]
    lines = [
        f"Command: `{payload['command']}` (figures of `make demo DEMO_ARGS=--fresh` run on "
        f"{run['run_date']})  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Date: {payload['date']}",
        "",
        "| | value |",
        "|---|---|",
        f"| wall time | {run['total_seconds'] / 60:.1f} min (training {run['max_iter']} "
        f"iterations at {run['seconds_per_iteration']:.2f} s/iteration + "
        f"{len(evaluations)} evaluations: {seconds['train + evaluate']:.0f} s, export "
        f"{seconds['export']:.0f} s) |",
        f"| held-out mask AP (AP50 / AP75) | {final['segm']['AP']:.1f} "
        f"({final['segm']['AP50']:.1f} / {final['segm']['AP75']:.1f}) |",
        f"| held-out box AP (AP50 / AP75) | {final['bbox']['AP']:.1f} "
        f"({final['bbox']['AP50']:.1f} / {final['bbox']['AP75']:.1f}) |",
        "| mask / box AP after " + ", ".join(str(e["iterations"]) for e in evaluations)
        + " iterations | " + ", ".join(f"{e['mask_AP']:.1f} / {e['box_AP']:.1f}"
                                       for e in evaluations) + " |",
        "",
        "| held-out COCO metrics | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ] + [f"| {label} | " + " | ".join(f"{final[task][k]:.1f}" for k in METRICS) + " |"
         for label, task in (("box", "bbox"), ("mask", "segm"))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        run = read_run(args.output_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    command = "python benchmarks/bench_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {
        "command": command.strip(),
        "environment": harness.environment(),
        "date": time.strftime("%Y-%m-%d"),
        "run": run,
    }
    print(harness.write_payload("bench_demo", payload, render(payload), args.write_results))


if __name__ == "__main__":
    main()
