"""
What helps at convergence (issue 29): the variant families against parity, trained until parity
has finished learning, paired by seed as in ``bench_variants.py``.

bench_variants' study stopped every model at 300 iterations of 4 images at 128 px, with parity
at 15-18 mask AP: its gains may be faster early learning rather than better models. This study
trains the demo's model and recipe of 2026-12-07 (ResNet-18 from scratch, 160 px, batches of
16, AdamW, fp32 + channels-last, the plugin's trainer with its fast CPU training path), frozen
in ``benchmarks/configs/convergence_study.yaml`` so that later demo changes leave it alone, for
``--iters`` iterations with the LR decayed x0.1 at ``--steps`` (fractions of the run), and
evaluates held-out box and mask AP every ``--eval-period`` iterations, so every run has an AP
curve. A run counts as converged when its held-out mask AP is flat over the last quarter of
the run (``plateau``: max - min of the evaluations in it within ``--plateau-tolerance``).

Configs (each one change against parity, the Detectron2 defaults the demo's recipe otherwise
departs from: sum fusion, nearest top-down upsampling, the plain FCN mask head):
``weighted_fusion``, ``bifpn``, ``mask_scoring``, ``panet_path``. Pairing, as in
bench_variants: the same initial weights outside the modules a config changes (copied from the
parity model of the seed), every RNG re-seeded after building (same data order, flips and
first ROI samples; each run records a fingerprint of its first batches and the report checks
they agree), the same held-out images.

Stages. Stage 1: parity and each family on ``--splits`` (default the harder split, the one
the pyramid variants are for), seeds ``--seeds``. Stage 2, once stage 1 is complete: the best
single family and the best combination (``select_stage2``) against parity on FRESH seeds
``--best-seeds`` on both splits, so their intervals are not flattered by the selection
(``--single`` / ``--combination`` fix them instead).

Each run trains in its own folder under ``--work-dir`` with the trainer's checkpoints, so a
killed run resumes from its last checkpoint; a finished run writes its record (metrics, AP and
loss curves, timings, provenance) to ``--runs-dir`` and its intermediate checkpoints are
removed (``model_final.pth`` stays). A rerun skips the runs whose record holds the same
settings. Each run takes the machine's CPU lock for itself (``--lock``): do NOT wrap this
script in ``cpulock``. Progress: the trainer's ``eta:`` lines, then runs done and the study's
ETA.

    .venv/bin/python benchmarks/bench_convergence.py --configs parity --seeds 0   # one run
    .venv/bin/python benchmarks/bench_convergence.py                              # the study
    .venv/bin/python benchmarks/bench_convergence.py --report-only                # tables

Outputs: ``output/benchmarks/bench_convergence.{md,json}`` (tables: AP per config, paired
differences with 95% intervals, plateau check per run) and ``bench_convergence_curves.png``
(held-out mask AP against iterations, per config, mean over seeds).
"""
import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # harness.py, bench_variants.py

import bench_variants as bv  # noqa: E402
import harness  # noqa: E402

NAME = "bench_convergence"
STUDY_YAML = os.path.join(REPO, "benchmarks", "configs", "convergence_study.yaml")
PARITY = bv.PARITY
SPLITS = bv.SPLITS
FINGERPRINT_BATCHES = 20  # the first batches (before any checkpoint a resume could restart from)

logger = logging.getLogger(NAME)

# The demo recipe's departures from Detectron2's FPN defaults, undone for parity: every config
# below is parity plus its own keys.
PARITY_OVERRIDES = ["MODEL.FPN.FUSE_TYPE", "sum", "MODEL.FPN.UPSAMPLE_MODE", "nearest"]

CONFIGS: Dict[str, bv.Variant] = {
    "weighted_fusion": bv.Variant(
        "weighted fusion (EfficientDet)", bv._COCO.format("weighted_fusion"),
        lambda s: ["MODEL.FPN.FUSE_TYPE", "weighted"], ("backbone.top_down_fusion",)),
    "bifpn": bv.Variant(
        "BiFPN, 3 cells", bv._COCO.format("bifpn"),
        lambda s: ["MODEL.FPN.BIFPN.ENABLED", True, "MODEL.FPN.BIFPN.NUM_CELLS", 3,
                   "MODEL.FPN.FUSE_TYPE", "weighted"],
        ("backbone.",)),  # the whole neck differs (only the bottom-up ResNet is shared)
    "mask_scoring": bv.Variant(
        "mask scoring head (MaskIoU)", bv._COCO.format("mask_scoring"),
        # the MaskIoU branch scaled as the demo's mask head is (64 conv channels, not 256)
        lambda s: ["MODEL.ROI_MASK_HEAD.NAME", "MaskScoringHead",
                   "MODEL.ROI_MASK_HEAD.MASK_SCORING.CONV_DIM", 64,
                   "MODEL.ROI_MASK_HEAD.MASK_SCORING.FC_DIM", 256],
        ("roi_heads.mask_head.maskiou",)),
    "panet_path": bv.Variant(
        "PANet bottom-up path", bv._COCO.format("panet"),
        lambda s: ["MODEL.FPN.BOTTOM_UP_PATH", True], ("backbone.pan_",)),
}
BEST = bv.BEST
ORDER = [PARITY, *CONFIGS, BEST]
# Families that cannot or need not be combined: BiFPN and the PANet path are each their own
# neck (the builder refuses both), and BiFPN already fuses with weighted fusion.
EXCLUSIVE = ({"bifpn", "panet_path"}, {"bifpn", "weighted_fusion"})


@dataclass
class Settings:
    """Everything that decides a run's result; a run record is reused only if these match."""
    iters: int = 960
    # LR x0.1 at 60% and x0.01 at 80%: the last quarter runs after the main decay, so a model
    # that has finished learning is flat there (Detectron2's 75% / 92% would put the decay's
    # jump inside it).
    steps: Tuple[float, float] = (0.6, 0.8)
    warmup: int = 30
    eval_period: int = 80
    num_train: int = 400
    num_val: int = 100
    threads: int = 2
    # sha256 of the study YAML's merged config (seed and folders left out): a changed demo
    # recipe makes earlier runs unusable for pairing with new ones.
    recipe: str = field(default="")

    def key(self) -> Dict[str, object]:
        key = asdict(self)
        key["steps"] = list(self.steps)
        return key

    def solver_steps(self) -> Tuple[int, int]:
        return tuple(int(round(f * self.iters)) for f in self.steps)


def study_cfg(settings: Settings, overrides: Sequence, split: str, seed: int, output_dir: str,
              data_root: str):
    """The demo config with the study's schedule, data and seed, parity's keys and
    ``overrides``, writing to ``output_dir`` (not frozen)."""
    from fpn_plugin import load_config

    cfg = load_config(STUDY_YAML, [], freeze=False)
    cfg.merge_from_list(PARITY_OVERRIDES + [
        "DATASETS.TRAIN", (f"{split}_train",),
        "DATASETS.TEST", (f"{split}_val",),
        "DATASETS.SHAPES.ROOT", os.path.join(data_root, "shapes"),
        "DATASETS.SHAPES.HARD.ROOT", os.path.join(data_root, "shapes_hard"),
        "DATASETS.SHAPES.NUM_TRAIN", settings.num_train,
        "DATASETS.SHAPES.NUM_VAL", settings.num_val,
        "SOLVER.MAX_ITER", settings.iters,
        "SOLVER.STEPS", settings.solver_steps(),
        "SOLVER.WARMUP_ITERS", settings.warmup,
        "SOLVER.CHECKPOINT_PERIOD", 2 * settings.eval_period,
        "TEST.EVAL_PERIOD", settings.eval_period,
        "SEED", seed,
        "OUTPUT_DIR", output_dir,
    ])
    cfg.merge_from_list(list(overrides))
    return cfg


def recipe_digest(settings: Settings, data_root: str) -> str:
    """sha256 (16 hex) of the parity config with the run-specific keys blanked."""
    cfg = study_cfg(settings, [], SPLITS[1], 0, "", data_root)
    cfg.SEED, cfg.OUTPUT_DIR = 0, ""
    cfg.DATASETS.SHAPES.ROOT = cfg.DATASETS.SHAPES.HARD.ROOT = ""
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


class FingerprintedLoader:
    """Iterates ``loader`` and hashes its first ``count`` batches (image ids, sizes, boxes)
    into ``digest``: the data-order fingerprint pairing is checked with."""

    def __init__(self, loader, digest, count: int):
        self.loader, self.digest, self.count = loader, digest, count

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i < self.count:
                self.digest.update(bv.batch_digest(batch))
            yield batch

    def __len__(self):
        return len(self.loader)


def paired_trainer_class(reference_cfg, seed: int, digest):
    """The plugin's ``Trainer`` whose model starts from ``reference_cfg``'s initial weights
    (both built from ``seed``) wherever names and shapes match, with every RNG re-seeded after
    building, and whose training batches feed ``digest``."""
    from detectron2.utils.env import seed_all_rng

    from fpn_plugin.engine import Trainer

    class PairedTrainer(Trainer):
        own_keys: List[str] = []

        @classmethod
        def build_model(cls, cfg):
            model, cls.own_keys = bv.build_paired_model(reference_cfg, cfg, seed)
            seed_all_rng(seed)  # data order, flips, ROI sampling: one start for every config
            return model

        @classmethod
        def build_train_loader(cls, cfg, records=None):
            return FingerprintedLoader(super().build_train_loader(cfg, records), digest,
                                       FINGERPRINT_BATCHES)

    return PairedTrainer


def read_metrics(path: str, iters: int) -> Tuple[List[list], List[list], List[float]]:
    """From a trainer's metrics.json: the AP curve ``[iterations done, mask AP, box AP]`` (one
    per evaluation, the last line of an iteration wins after a resume), the loss curve
    ``[iterations done, total_loss]`` and the per-window iteration times ("time", seconds).
    A line's "iteration" is the 0-based index of the step just run, except after training
    (the final evaluation), where Detectron2 logs the run's length (``iters``; one more when a
    finished run was resumed): so iterations done = min(iteration + 1, iters)."""
    ap, loss, times = {}, {}, {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("iteration") is None:
                continue
            done = min(row["iteration"] + 1, iters)
            if "segm/AP" in row:
                ap[done] = [done, row["segm/AP"], row.get("bbox/AP")]
            if "total_loss" in row:
                loss[done] = [done, round(row["total_loss"], 4)]
            if "time" in row:
                times[done] = round(row["time"], 4)
    return ([ap[k] for k in sorted(ap)], [loss[k] for k in sorted(loss)],
            [times[k] for k in sorted(times)])


def plateau(curve: Sequence[Sequence[float]], iters: int, tolerance: float) -> Dict[str, object]:
    """
    Whether held-out mask AP is flat over the last quarter of a run: the evaluations at
    iterations >= 3/4 of ``iters`` span at most ``tolerance`` AP points (and there are at least
    two of them). Returns the points used, their span and the verdict.
    """
    tail = [p for p in curve if p[0] >= 0.75 * iters and p[1] is not None]
    span = (max(p[1] for p in tail) - min(p[1] for p in tail)) if tail else None
    return {"iterations": [p[0] for p in tail], "mask_ap": [p[1] for p in tail],
            "span": None if span is None else round(span, 2),
            "flat": bool(len(tail) >= 2 and span <= tolerance)}


def _remove_intermediate_checkpoints(folder) -> List[str]:
    """The trainer's periodic checkpoints (model_NNNNNNN.pth) of a finished run, through the
    plugin's output boundary (``folder``: an ``OutputFolder``): only those it recorded as
    created by the run; model_final.pth keeps the result."""
    periodic = [f for f in folder.created()
                if f.startswith("model_") and f.endswith(".pth") and f[6:-4].isdigit()]
    return [os.path.join(folder.path, f) for f in folder.clean(periodic)]


def _close(trainer) -> None:
    """End a finished trainer's data-loader workers: its endless training loader keeps them
    alive (a worker per run, about 1.4 GB each here) until the iterator is collected, which
    the trainer's reference cycles delay."""
    import gc

    loop = getattr(trainer, "_trainer", None)
    for owner in (loop, trainer):
        for name in ("_data_loader_iter_obj", "_data_loader_iter"):
            it = getattr(owner, name, None) if owner is not None else None
            if hasattr(it, "close"):  # the FingerprintedLoader generator: closes its loader
                it.close()
    del trainer, loop
    gc.collect()


def run_one(spec: bv.RunSpec, settings: Settings, work_dir: str, data_root: str) -> dict:
    """Train (resuming from the run's folder) and evaluate one (split, config, seed)."""
    import torch

    from fpn_plugin.data.shapes import register_shapes_from_config
    from fpn_plugin.io.output import OutputFolder

    torch.set_num_threads(settings.threads)
    folder = os.path.join(work_dir, spec.split, spec.config, f"seed{spec.seed}")
    overrides = bv.combined_overrides(spec.variants, 0, CONFIGS)
    cfg = study_cfg(settings, overrides, spec.split, spec.seed, folder, data_root)
    parity_cfg = study_cfg(settings, [], spec.split, spec.seed, folder, data_root)
    cfg.freeze()
    parity_cfg.freeze()
    register_shapes_from_config(cfg)
    digest = hashlib.sha256()
    output = OutputFolder(folder)
    before = output.files()
    try:
        trainer = paired_trainer_class(parity_cfg, spec.seed, digest)(cfg)
        trainer.resume_or_load(resume=True)
        resumed_at = trainer.start_iter
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    finally:
        output.adopt_new(before)  # what the trainer wrote is the run's (so it may be removed)
    val_name = cfg.DATASETS.TEST[0]
    results = getattr(trainer, "_last_eval_results", None) or {}
    results = results.get(val_name, results)
    metrics = {task: {k: (round(float(v), 2) if v == v else None) for k, v in res.items()}
               for task, res in results.items()}
    ap_curve, loss_curve, times = read_metrics(os.path.join(folder, "metrics.json"),
                                                 settings.iters)
    _remove_intermediate_checkpoints(output)
    own_keys = trainer.own_keys
    params = sum(p.numel() for p in trainer.model.parameters())
    _close(trainer)
    return {
        "split": spec.split, "config": spec.config, "seed": spec.seed,
        "variants": list(spec.variants), "overrides": overrides, "settings": settings.key(),
        "metrics": metrics, "ap_curve": ap_curve, "curve": loss_curve,
        "iteration_times": times,  # the trainer's median "time" per 20-iteration window
        "resumed_at": resumed_at,  # 0: trained in one go (the fingerprint covers its start)
        "data_fingerprint": digest.hexdigest()[:16] if resumed_at == 0 else None,
        "own_modules": sorted({k.rsplit(".", 1)[0] for k in own_keys}),
        "params": params,
        "train_and_eval_seconds": round(seconds, 1),
        "work_dir": os.path.relpath(folder, REPO),
    }


def compatible(names: Sequence[str]) -> bool:
    return not any(len(group & set(names)) > 1 for group in EXCLUSIVE)


def select_stage2(summary: Dict[str, object], splits: Sequence[str]) -> Dict[str, List[str]]:
    """
    From stage 1 (paired mask-AP differences to parity on ``splits``):

    - ``single``: the family with the highest mean gain (over the splits);
    - ``combination``: the families whose gain is significant on every split (95% interval
      above 0), highest mean first, each added only if it can be combined with those before
      (``EXCLUSIVE``); if that leaves fewer than two, the two highest positive means that
      combine. Empty when no two families with a positive mean combine.
    """
    means, significant = {}, []
    for name in CONFIGS:
        diffs = [summary.get(s, {}).get("rows", {}).get(name, {}).get("mask_diff") for s in splits]
        if all(d and d.get("mean") is not None for d in diffs):
            means[name] = statistics.fmean(d["mean"] for d in diffs)
            if all(d.get("low") is not None and d["low"] > 0 for d in diffs):
                significant.append(name)
    if not means:
        return {"single": [], "combination": []}
    ranked = sorted(means, key=means.get, reverse=True)

    def greedy(candidates):
        chosen: List[str] = []
        for name in candidates:
            if compatible(chosen + [name]):
                chosen.append(name)
        return chosen

    combination = greedy([n for n in ranked if n in significant])
    if len(combination) < 2:
        combination = greedy([n for n in ranked if means[n] > 0])[:2]
    return {"single": ranked[:1], "combination": combination if len(combination) >= 2 else []}


def stage2_specs(splits: Sequence[str], chosen: Dict[str, List[str]], seeds: Sequence[int]):
    """Parity, the best single family and the best combination (``plugin_best``), seed-major."""
    configs = [(PARITY, ())]
    if chosen["single"]:
        configs.append((chosen["single"][0], tuple(chosen["single"])))
    if chosen["combination"]:
        configs.append((BEST, tuple(chosen["combination"])))
    return [bv.RunSpec(split, c, seed, v) for seed in seeds for split in splits for c, v in configs]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _label(config: str, row: Dict[str, object]) -> str:
    if config == PARITY:
        return "parity (Detectron2's FPN and mask head)"
    if config == BEST:
        return "**best combination**: " + " + ".join(row["variants"])
    return CONFIGS[config].label


def format_markdown(stages, results, settings: Settings, tolerance: float, command: str,
                    env: Dict[str, str], date: str) -> str:
    """``stages``: (title, summary) per stage, each summary from ``bv.summarize``."""
    cpu_seconds = sum(r.get("run_seconds", 0.0) for r in results)
    a, b = settings.solver_steps()
    lines = [
        f"Command: `{command}`  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Date: {date}",
        "",
        f"Study: the demo's model and recipe (benchmarks/configs/convergence_study.yaml, "
        f"digest {settings.recipe}) trained "
        f"{settings.iters} iterations of 16 images (LR x0.1 at {a} and x0.01 at {b}), held-out "
        f"AP every {settings.eval_period}; {settings.num_train} train / {settings.num_val} "
        f"held-out images per split; {len(results)} runs, {cpu_seconds / 60:.0f} min under the "
        "CPU lock in all.",
        "",
        bv.runs_provenance(results),
    ]
    for title, summary in stages:
        lines += ["", f"**{title}**"] + bv.split_tables(summary, _label)
    lines += ["", f"Plateau (held-out mask AP over the last quarter of each run spans <= "
                  f"{tolerance:g} AP points):", "",
              "| run | mask AP at the last-quarter evaluations | span | flat |",
              "|---|---|---|---|"]
    for r in results:
        p = plateau(r.get("ap_curve", []), settings.iters, tolerance)
        points = ", ".join(f"{i}: {v:.1f}" for i, v in zip(p["iterations"], p["mask_ap"]))
        lines.append(f"| {r['split']}/{r['config']}/seed{r['seed']} | {points} | {p['span']} | "
                     f"{'yes' if p['flat'] else 'NO'} |")
    lines += ["", "AP: mean ± SD over seeds. Δ: mean of the per-seed differences to the parity "
                  "run of the same seed, with a 95% Student-t interval on those differences "
                  "(n - 1 degrees of freedom); bold: the interval excludes 0."]
    return "\n".join(lines) + "\n"


def plot_curves(results: Sequence[dict], iters: int, path: str) -> str:
    """Held-out mask AP against iterations per split and config (mean over the seeds that
    have an evaluation at that iteration), the last quarter shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({r["split"] for r in results}, key=lambda s: (s not in SPLITS, s))
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for config in ORDER:
            runs = [r for r in results if r["split"] == split and r["config"] == config
                    and r.get("ap_curve")]
            if not runs:
                continue
            by_iter: Dict[int, List[float]] = {}
            for r in runs:
                for it, mask_ap, _ in r["ap_curve"]:
                    by_iter.setdefault(it, []).append(mask_ap or 0.0)
            its = sorted(by_iter)
            style = dict(color="black", lw=2) if config == PARITY else dict(lw=1)
            ax.plot(its, [statistics.fmean(by_iter[i]) for i in its], marker=".",
                    label=f"{config} ({len(runs)} seeds)", **style)
        ax.axvspan(0.75 * iters, iters, color="gray", alpha=0.12, label="last quarter")
        ax.set_xlabel("iteration")
        ax.set_ylabel("held-out mask AP (mean over seeds)")
        ax.set_title(split)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Settings()
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--steps", type=float, nargs=2, default=list(d.steps),
                   help="LR decay points as fractions of --iters")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--eval-period", type=int, default=d.eval_period)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=["shapes_hard"])
    p.add_argument("--configs", nargs="+", choices=[PARITY, *CONFIGS],
                   default=[PARITY, *CONFIGS], help="stage 1 configs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage 1 seeds")
    p.add_argument("--best-seeds", type=int, nargs="*", default=[3, 4, 5],
                   help="stage 2 seeds, fresh (disjoint from --seeds); none: stage 1 only")
    p.add_argument("--best-splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="stage 2 splits")
    p.add_argument("--single", nargs=1, choices=sorted(CONFIGS),
                   help="fix stage 2's single family instead of selecting it from stage 1")
    p.add_argument("--combination", nargs="+", choices=sorted(CONFIGS),
                   help="fix stage 2's combination instead of selecting it from stage 1")
    p.add_argument("--plateau-tolerance", type=float, default=1.0,
                   help="largest span of mask AP over the last quarter that counts as flat")
    p.add_argument("--report-only", action="store_true", help="no training: tables from files")
    p.add_argument("--lock", default=bv.DEFAULT_LOCK, help="CPU lock file taken per run ('' none)")
    p.add_argument("--data-root", default=os.path.join(REPO, "datasets", "generated", NAME))
    p.add_argument("--work-dir", default=os.path.join(harness.OUTPUT_DIR, f"{NAME}_work"),
                   help="the runs' training folders (checkpoints, metrics.json, logs)")
    p.add_argument("--runs-dir", default=os.path.join(harness.RESULTS_DIR, f"{NAME}_runs"),
                   help="the finished runs' records (tracked)")
    harness.add_output_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings(args.iters, tuple(args.steps), args.warmup, args.eval_period,
                        args.num_train, args.num_val, args.threads)
    if args.write_results and NAME not in harness.MEASURED_PATHS:
        # every tracked result names the code it measures (tests/benchmarks/test_provenance.py)
        raise SystemExit(f"error: --write-results needs {NAME} in harness.MEASURED_PATHS first "
                         "(the study's run records are tracked already; its tables go to "
                         f"{os.path.relpath(harness.OUTPUT_DIR, REPO)}/ until then)")
    settings.recipe = recipe_digest(settings, args.data_root)
    if set(args.seeds) & set(args.best_seeds):
        raise SystemExit("error: --best-seeds must be fresh seeds, disjoint from --seeds")
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    loaded_from = harness.provenance()  # once: the code this process runs
    stage1 = [bv.RunSpec(split, c, seed, () if c == PARITY else (c,))
              for seed in args.seeds for split in args.splits for c in args.configs]

    def stage(specs):
        if args.report_only:
            return [r for r in (bv.load_run(bv.run_path(args.runs_dir, s), settings, s)
                                for s in specs) if r]
        return bv.execute(
            specs, settings, args.runs_dir,
            lambda spec, progress: run_one(spec, settings, args.work_dir, args.data_root),
            args.lock, loaded_from)

    results = stage(stage1)
    if not results:
        raise SystemExit(f"error: no finished runs in {args.runs_dir} with these settings")
    summary1 = bv.summarize(results, ORDER)
    stages = [(f"Stage 1: each family against parity, seeds {args.seeds}", summary1)]
    chosen = {"single": list(args.single or []), "combination": list(args.combination or [])}
    if not (args.single or args.combination):
        chosen = select_stage2(summary1, args.splits)
    if args.best_seeds and len(results) == len(stage1) and chosen["single"]:
        if not compatible(chosen["combination"]):
            raise SystemExit(f"error: {chosen['combination']} cannot be combined ({EXCLUSIVE})")
        print(f"[{NAME}] stage 2: best single {chosen['single']}, best combination "
              f"{chosen['combination'] or '(none: fewer than two families gain)'}", flush=True)
        results2 = stage(stage2_specs(args.best_splits, chosen, args.best_seeds))
        if results2:
            stages.append((f"Stage 2: the best single family and the best combination against "
                           f"parity on fresh seeds {args.best_seeds}",
                           bv.summarize(results2, ORDER)))
            results = results + results2
    elif args.best_seeds:
        print(f"[{NAME}] stage 2 waits for stage 1: {len(results)}/{len(stage1)} runs finished",
              flush=True)
    from fpn_plugin.utils.files import atomic_write_bytes, atomic_write_json

    env, date = harness.environment(), time.strftime("%Y-%m-%d")
    markdown = format_markdown(stages, results, settings, args.plateau_tolerance, command,
                               env, date)
    folder = harness.RESULTS_DIR if args.write_results else harness.OUTPUT_DIR
    os.makedirs(folder, exist_ok=True)
    payload = {"command": command, "environment": env, "date": date,
               "provenance": dict(loaded_from), "settings": settings.key(),
               "stages": [{"title": t, "summary": sm} for t, sm in stages], "stage2": chosen,
               "plateau_tolerance": args.plateau_tolerance,
               "runs": [{k: r[k] for k in ("split", "config", "seed", "metrics", "ap_curve",
                                           "run_seconds", "data_fingerprint", "provenance")
                         if k in r} for r in results]}
    atomic_write_json(os.path.join(folder, f"{NAME}.json"), payload, indent=1)
    atomic_write_bytes(os.path.join(folder, f"{NAME}.md"), markdown.encode())
    pictures = [plot_curves(results, settings.iters,
                            os.path.join(folder, f"{NAME}_curves.png"))]
    for i, (_, summary) in enumerate(stages):  # paired differences with intervals, per stage
        pictures += bv.plot(summary, results, folder, f"{NAME}_stage{i + 1}")
    print(markdown + f"[{NAME}] written: {os.path.join(folder, NAME)}.{{md,json}}, "
          + ", ".join(os.path.basename(p) for p in pictures), flush=True)
    return stages


if __name__ == "__main__":
    main()
