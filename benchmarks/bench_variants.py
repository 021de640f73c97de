"""
Which variants help: every variant family trained against the parity config, paired by seed.

The study trains a small Mask R-CNN (ResNet-18 + the plugin's neck, RPN and mask head, from
scratch, 128 px; the model and loop of ``bench_mask_heads.py``) once per (split, config, seed)
on two splits of the embedded shapes dataset: today's (``shapes_*``) and the harder one
(``shapes_hard_*``: smaller objects, more of them, clutter). Every run of a seed is PAIRED with
the parity run of that seed:

- same initial weights outside the changed modules: the parity model is built from the seed,
  the variant from the same seed, and every parameter/buffer whose name and shape match is
  copied from the parity model (so new modules do not shift the random draws of the rest);
- same data order, flips and first ROI samples: every RNG is re-seeded after building, the
  sampler has its own seeded generator and the data is loaded in-process. Each run records a
  fingerprint of every batch it saw (image ids and boxes); the report checks they agree.

Stage 1: parity and each variant family, seeds ``--seeds``. Stage 2: the "plugin best" config,
the combination of the families whose paired mask-AP gain is significant (95% interval above
0) on every stage-1 split (else the best one), against parity on FRESH seeds ``--best-seeds``,
so its interval is not flattered by the selection. Reported per split and config: mean and SD
of held-out box and mask AP, and the mean paired difference to parity with a 95% Student-t
interval on the per-seed differences (n - 1 degrees of freedom).

Each run takes the machine's CPU lock (``--lock``, default /tmp/fpn_cpu.lock, the file
``cpulock`` uses) for itself and releases it after, so other jobs interleave: do NOT wrap this
script in ``cpulock``. Each finished run writes its own JSON file; a rerun skips the runs whose
file holds the same study settings (resume after a kill). Progress: runs done, this run's
iterations, ETA.

    .venv/bin/python benchmarks/bench_variants.py                    # the study (resumes)
    .venv/bin/python benchmarks/bench_variants.py --write-results    # tracked results + README
    .venv/bin/python benchmarks/bench_variants.py --report-only      # tables from finished runs
    .venv/bin/python benchmarks/bench_variants.py --pilot --iters 300 --configs parity neck_gn

Outputs (``output/benchmarks/`` unless ``--write-results``: ``benchmarks/results/``):
``bench_variants.{md,json}`` (tables; the md is README's ``<!-- bench:bench_variants -->``
block), ``bench_variants.png`` (paired differences with intervals), ``bench_variants_curves.png``
(training loss per config), and the run files in ``bench_variants_runs/``.
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # harness.py, bench_mask_heads.py

import harness  # noqa: E402

NAME = "bench_variants"
DEFAULT_LOCK = "/tmp/fpn_cpu.lock"
SPLITS = ("shapes", "shapes_hard")
PARITY = "parity"
BEST = "plugin_best"

logger = logging.getLogger(NAME)


# ---------------------------------------------------------------------------------------------
# The configs: each variant family as the keys its COCO YAML changes, scaled to the study
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    label: str
    yaml: str  # the COCO config of configs/COCO-InstanceSegmentation/ it stands for
    # Config overrides, as a function of the image side (anchor sizes and proposal budgets
    # scale with it).
    overrides: Callable[[int], List]
    # State-dict key prefixes of the modules it changes: only there may the initial weights
    # differ from parity's (checked by tests/benchmarks/test_bench_variants.py).
    changes: Tuple[str, ...] = ()


def _anchor_sizes(s: int) -> List[List[int]]:
    """The study's anchor sizes on five levels (bench_mask_heads.build_cfg's)."""
    return [[s // 16], [s // 8], [s // 4], [s // 2], [s]]


def _p3p7(s: int) -> List:
    # RetinaNet's pyramid: the neck reads res3..res5, P6/P7 come from stride-2 convs on P5; the
    # RPN keeps the same five anchor sizes, one level coarser each; ROI heads pool P3..P5.
    return ["MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
            "MODEL.FPN.TOP_BLOCK", "p6p7_p5",
            "MODEL.RPN.IN_FEATURES", ["p3", "p4", "p5", "p6", "p7"],
            "MODEL.ROI_HEADS.IN_FEATURES", ["p3", "p4", "p5"]]


def _per_level_topk(s: int) -> List:
    # The COCO YAML's budgets scaled to the study's 600 / 300 (train) and 300 / 100 (test):
    # twice the base pre-NMS top-k on P2 (4x the anchors of P3), post-NMS top-k per level
    # adding up to the base config's per-image budget.
    return ["MODEL.RPN.PRE_NMS_TOPK_TRAIN_PER_LEVEL", [1200, 600, 300, 300, 300],
            "MODEL.RPN.PRE_NMS_TOPK_TEST_PER_LEVEL", [600, 300, 300, 150, 150],
            "MODEL.RPN.POST_NMS_TOPK_MODE", "per_level",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN_PER_LEVEL", [120, 75, 45, 30, 30],
            "MODEL.RPN.POST_NMS_TOPK_TEST_PER_LEVEL", [40, 25, 15, 10, 10]]


_COCO = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_{}_1x.yaml"
VARIANTS: Dict[str, Variant] = {
    "panet_path": Variant("PANet bottom-up path", _COCO.format("panet"),
                          lambda s: ["MODEL.FPN.BOTTOM_UP_PATH", True], ("backbone.pan_",)),
    "weighted_fusion": Variant("weighted fusion (EfficientDet)", _COCO.format("weighted_fusion"),
                               lambda s: ["MODEL.FPN.FUSE_TYPE", "weighted"],
                               ("backbone.top_down_fusion",)),
    "bilinear": Variant("bilinear top-down upsampling", _COCO.format("bilinear"),
                        lambda s: ["MODEL.FPN.UPSAMPLE_MODE", "bilinear"]),
    "neck_gn": Variant("GroupNorm in the neck", _COCO.format("neck_gn"),
                       lambda s: ["MODEL.FPN.NORM", "GN"], ("backbone.fpn_",)),
    "p3p7": Variant("P3-P7 pyramid (RetinaNet)", _COCO.format("p3p7"), _p3p7,
                    ("backbone.top_block.",)),
    "unshared_rpn": Variant("RPN head per level", _COCO.format("unshared_rpn"),
                            lambda s: ["MODEL.RPN.SHARED_HEAD", False],
                            ("proposal_generator.rpn_head.",)),
    "per_level_anchors": Variant(
        "5 anchors on P6", _COCO.format("per_level_anchors"),
        lambda s: ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
                   [[0.5, 1.0, 2.0]] * 4 + [[0.25, 0.5, 1.0, 2.0, 4.0]]],
        ("proposal_generator.rpn_head.",)),
    "per_level_topk": Variant("per-level proposal top-k", _COCO.format("gn_rpn_per_level_topk"),
                              _per_level_topk),
    "panet_mask": Variant("PANet mask head", _COCO.format("panet_mask"),
                          lambda s: ["MODEL.ROI_MASK_HEAD.NAME", "PANetMaskHead",
                                     "MODEL.ROI_MASK_HEAD.POOLER_TYPE", ""],
                          ("roi_heads.mask_head.",)),
}


def combined_overrides(names: Sequence[str], image_size: int,
                       variants: Optional[Dict[str, "Variant"]] = None) -> List:
    """The overrides of several variants (of ``variants``, default this study's) together;
    two that set one key differently clash."""
    merged: Dict[str, object] = {}
    for name in names:
        ov = (variants or VARIANTS)[name].overrides(image_size)
        for key, value in zip(ov[0::2], ov[1::2]):
            if key in merged and merged[key] != value:
                raise ValueError(f"variants {list(names)} set {key} to different values")
            merged[key] = value
    return [x for kv in merged.items() for x in kv]


# ---------------------------------------------------------------------------------------------
# Settings, runs, files
# ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything that decides a run's result; a run file is reused only if these match."""
    iters: int = 600
    batch: int = 4
    lr: float = 1e-3
    image_size: int = 128
    num_train: int = 400
    num_val: int = 100
    precision: str = "fp32"
    threads: int = 2

    def key(self) -> Dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    split: str
    config: str  # "parity", a VARIANTS name, or "plugin_best"
    seed: int
    variants: Tuple[str, ...] = ()  # the variant families it combines

    @property
    def run_id(self) -> str:
        return f"{self.split}/{self.config}/seed{self.seed}"


def run_path(runs_dir: str, spec: RunSpec) -> str:
    return os.path.join(runs_dir, spec.split, spec.config, f"seed{spec.seed}.json")


def load_run(path: str, settings: Settings, spec: RunSpec) -> Optional[dict]:
    """A finished run's result if its file exists and was made with these settings."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    if result.get("settings") != settings.key() or \
            tuple(result.get("variants", ())) != spec.variants:
        return None
    return result


def write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def cpu_lock(path: Optional[str]):
    """
    Hold the machine-wide CPU lock (``flock`` on ``path``, as ``cpulock`` does) for one run;
    yields the seconds spent waiting for it. ``path`` None or "": no lock.
    """
    if not path:
        yield 0.0
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    start = time.perf_counter()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{NAME}] waiting for the CPU lock {path} (another job holds it; this script "
                  "takes it per run, so never run it under cpulock)", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - start
    finally:
        # Unlock explicitly: a process forked during the run (a data-loader worker still
        # alive) shares this open file and would keep the lock after a mere close.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def _t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (closed form, Abramowitz-Stegun 26.7.3/4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = term = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            total *= math.sin(theta) * math.cos(theta)
        return 2 / math.pi * (theta + total)
    total = term = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t critical value: P(|T| < t) = ``confidence`` (df >= 1)."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got {df}, {confidence}")
    lo, hi = 0.0, 1.0
    while _t_two_sided_coverage(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_coverage(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> Dict[str, object]:
    """Mean of paired differences, their SD and the Student-t interval (n - 1 df) on the mean."""
    n = len(differences)
    mean = statistics.fmean(differences) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None}
    sd = statistics.stdev(differences)
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def _ap(result: dict, task: str) -> float:
    value = result["metrics"][task]["AP"]
    return 0.0 if value is None else value  # no detections at all scores AP 0


def summarize(results: Sequence[dict], order: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """
    Per split and config: seeds, box/mask AP mean and SD, and the paired differences to the
    parity runs of the same seeds. Also whether every run of a (split, seed) saw the same data.
    ``order``: the configs in table order (default this study's: parity, the families, best).
    """
    by_key = {(r["split"], r["config"], r["seed"]): r for r in results}
    out: Dict[str, object] = {}
    for split in sorted({r["split"] for r in results}, key=lambda s: (s not in SPLITS, s)):
        rows = {}
        configs = [c for c in (order or [PARITY, *VARIANTS, BEST])
                   if any(k[:2] == (split, c) for k in by_key)]
        for config in configs:
            runs = sorted((r for k, r in by_key.items() if k[:2] == (split, config)),
                          key=lambda r: r["seed"])
            row = {"seeds": [r["seed"] for r in runs], "variants": runs[0].get("variants", [])}
            for task, label in (("segm", "mask"), ("bbox", "box")):
                values = [_ap(r, task) for r in runs]
                row[f"{label}_ap"] = values
                row[f"{label}_mean"] = statistics.fmean(values)
                row[f"{label}_sd"] = statistics.stdev(values) if len(values) > 1 else None
                if config != PARITY:
                    diffs = [_ap(r, task) - _ap(by_key[(split, PARITY, r["seed"])], task)
                             for r in runs if (split, PARITY, r["seed"]) in by_key]
                    row[f"{label}_diff"] = {**paired_interval(diffs), "values": diffs}
            rows[config] = row
        fingerprints = {}
        for (s, _, seed), r in by_key.items():
            if s == split:
                fingerprints.setdefault(seed, set()).add(r.get("data_fingerprint"))
        out[split] = {"rows": rows,
                      "same_data_per_seed": all(len(f) == 1 for f in fingerprints.values())}
    return out


def select_best(summary: Dict[str, object], splits: Sequence[str] = SPLITS) -> List[str]:
    """
    The "plugin best" families from stage 1: those whose paired mask-AP gain is significant on
    every split (95% interval above 0); if none is, the one with the highest mean over the
    splits. A family whose interval contains 0 is as likely to cost AP as to add it, and each
    one added to the combination adds its noise, so only measured gains are combined.
    """
    means, chosen = {}, []
    for name in VARIANTS:
        diffs = [summary[s]["rows"].get(name, {}).get("mask_diff", {}) for s in splits]
        if all(d.get("mean") is not None for d in diffs):
            means[name] = statistics.fmean(d["mean"] for d in diffs)
            if all(d.get("low") is not None and d["low"] > 0 for d in diffs):
                chosen.append(name)
    if not chosen and means:
        chosen = [max(means, key=means.get)]
    return chosen


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def study_cfg(settings: Settings, overrides: Sequence, split: str, data_root: str, seed: int):
    """The study's config (bench_mask_heads.build_cfg's model, AdamW) plus ``overrides``."""
    import bench_mask_heads

    from fpn_plugin.config import add_shapes_config

    args = argparse.Namespace(components="plugin", image_size=settings.image_size,
                              batch=settings.batch, lr=settings.lr, iters=settings.iters)
    names = (f"{split}_train", f"{split}_val")
    cfg, _ = bench_mask_heads.build_cfg(args, PARITY, seed, *names)
    cfg.defrost()
    add_shapes_config(cfg)  # the study trains on the shapes dataset: its DATASETS.SHAPES keys
    cfg.merge_from_list([
        # From scratch in a few hundred steps AdamW gets far further than SGD (the demo's
        # tuning); Detectron2's schedule shape: warm-up, x0.1 at 75% and 92%.
        "SOLVER.OPTIMIZER", "ADAMW",
        "DATASETS.SHAPES.ROOT", os.path.join(data_root, "shapes"),
        "DATASETS.SHAPES.HARD.ROOT", os.path.join(data_root, "shapes_hard"),
        "DATASETS.SHAPES.NUM_TRAIN", settings.num_train,
        "DATASETS.SHAPES.NUM_VAL", settings.num_val,
        "DATASETS.SHAPES.IMAGE_SIZE", settings.image_size,
    ])
    cfg.merge_from_list(list(overrides))
    cfg.freeze()
    return cfg


def build_paired_model(reference_cfg, cfg, seed: int):
    """
    ``cfg``'s model with the initial weights of ``reference_cfg``'s (both built from ``seed``)
    wherever a parameter or buffer has the same name and shape.

    Returns:
        model, and the sorted keys of its state dict that were NOT copied (its own modules).
    """
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(seed)
    reference = build_model(reference_cfg).state_dict()
    seed_all_rng(seed)
    model = build_model(cfg)
    own = model.state_dict()
    shared = {k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        model.load_state_dict(shared, strict=False)
    return model, sorted(set(own) - set(shared))


def batch_digest(batch) -> bytes:
    """What a training batch is, for the data-order fingerprint: image ids, sizes and boxes."""
    h = hashlib.sha256()
    for d in batch:
        h.update(f"{d.get('image_id')}:{tuple(d['image'].shape)}".encode())
        h.update(d["instances"].gt_boxes.tensor.numpy().tobytes())
    return h.digest()


def run_one(spec: RunSpec, settings: Settings, data_root: str, progress: str = "",
            curve_every: int = 10) -> dict:
    """Train and evaluate one (split, config, seed); returns the run's result record."""
    import torch

    import bench_mask_heads
    from fpn_plugin.data.shapes import register_shapes_from_config

    torch.set_num_threads(settings.threads)
    overrides = combined_overrides(spec.variants, settings.image_size)
    cfg = study_cfg(settings, overrides, spec.split, data_root, spec.seed)
    parity_cfg = study_cfg(settings, [], spec.split, data_root, spec.seed)
    register_shapes_from_config(cfg)
    model, own_keys = build_paired_model(parity_cfg, cfg, spec.seed)

    fingerprint = hashlib.sha256()
    curve: List[list] = []
    window: List[float] = []
    start = time.perf_counter()

    def on_step(it, total, losses, batch):
        fingerprint.update(batch_digest(batch))
        window.append(total)
        if (it + 1) % curve_every == 0 or it + 1 == settings.iters:
            curve.append([it + 1, round(statistics.fmean(window), 4)])
            window.clear()
        if (it + 1) % 100 == 0 or it + 1 == settings.iters:
            elapsed = time.perf_counter() - start
            eta = elapsed / (it + 1) * (settings.iters - it - 1)
            print(f"[{NAME}] {progress}{spec.run_id}: iter {it + 1}/{settings.iters}, "
                  f"loss {total:.3f}, {elapsed / (it + 1):.2f} s/iter, run ETA {eta:.0f} s",
                  flush=True)

    model, train_seconds, last = bench_mask_heads.train(
        cfg, spec.seed, model=model, on_step=on_step, precision=settings.precision)
    eval_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = bench_mask_heads.evaluate(cfg, model, tmp)
    eval_seconds = time.perf_counter() - eval_start
    return {
        "split": spec.split, "config": spec.config, "seed": spec.seed,
        "variants": list(spec.variants), "overrides": overrides, "settings": settings.key(),
        "metrics": metrics, "final_losses": last, "curve": curve,
        "data_fingerprint": fingerprint.hexdigest()[:16],
        "own_modules": sorted({k.rsplit(".", 1)[0] for k in own_keys}),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
    }


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------
def stage1_specs(splits: Sequence[str], configs: Sequence[str], seeds: Sequence[int]):
    """Seed-major order, so a partial study has every config on its first seeds."""
    return [RunSpec(split, c, seed, () if c == PARITY else (c,))
            for seed in seeds for split in splits for c in configs]


def stage2_specs(splits: Sequence[str], best: Sequence[str], seeds: Sequence[int]):
    return [RunSpec(split, c, seed, v) for seed in seeds for split in splits
            for c, v in ((PARITY, ()), (BEST, tuple(best)))]


def execute(specs: Sequence[RunSpec], settings: Settings, runs_dir: str,
            run_fn: Callable[[RunSpec, str], dict], lock: Optional[str],
            loaded_from: Optional[Dict[str, object]] = None) -> List[dict]:
    """
    Run every spec without a finished file (``run_fn(spec, progress)`` returns its record),
    each under the CPU lock, writing its file when done; returns all records, in spec order.
    Each record carries its provenance: the commit and tree state the process loaded its code
    from (``loaded_from``: the study takes it once when it starts, so later edits to the tree
    do not blur it; taken here before any run if not given), the machine and CPU flags, and
    when the run finished.
    """
    if loaded_from is None:
        loaded_from = harness.provenance()
    results, todo = {}, []
    for spec in specs:
        done = load_run(run_path(runs_dir, spec), settings, spec)
        if done is not None:
            results[spec] = done
        else:
            todo.append(spec)
    if todo:
        print(f"[{NAME}] {len(specs) - len(todo)}/{len(specs)} runs already finished, "
              f"{len(todo)} to go", flush=True)
    own_seconds = [r["run_seconds"] for r in results.values() if "run_seconds" in r]
    for i, spec in enumerate(todo):
        with cpu_lock(lock) as waited:
            start = time.perf_counter()
            record = run_fn(spec, f"[{i + 1}/{len(todo)}] ")
            record["run_seconds"] = round(time.perf_counter() - start, 1)
            record["lock_wait_seconds"] = round(waited, 1)
            record["provenance"] = dict(loaded_from, measured_at=time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json_atomic(run_path(runs_dir, spec), record)
        results[spec] = record
        own_seconds.append(record["run_seconds"])
        eta = statistics.fmean(own_seconds) * (len(todo) - i - 1)
        segm = record["metrics"].get("segm", {}).get("AP")
        bbox = record["metrics"].get("bbox", {}).get("AP")
        print(f"[{NAME}] done {i + 1}/{len(todo)}: {spec.run_id} mask AP {segm}, box AP {bbox}, "
              f"{record['run_seconds']:.0f} s (waited {waited:.0f} s for the lock); "
              f"ETA {eta / 60:.0f} min of runs", flush=True)
    return [results[s] for s in specs]


def runs_provenance(results: Sequence[dict]) -> str:
    """One line: the days, commits and machines the runs were measured on (from each run's
    own provenance; runs recorded before runs carried one are counted as such)."""
    known = [r["provenance"] for r in results if r.get("provenance")]
    days = sorted({p["measured_at"][:10] for p in known})
    commits = sorted({(p.get("commit") or "?")[:10] + (" (dirty tree)" if p.get("dirty") else "")
                      for p in known})
    hosts = sorted({f"{p.get('hostname', '?')} ({p.get('cpu_flags', '?')})" for p in known})
    unknown = len(results) - len(known)
    return (f"Runs measured on {', '.join(days) or '-'}; commits {', '.join(commits) or '-'}; "
            f"machines {', '.join(hosts) or '-'}"
            + (f"; {unknown} runs without provenance (recorded before runs carried one)."
               if unknown else "."))


def _label(config: str, row: Dict[str, object]) -> str:
    return (VARIANTS[config].label if config in VARIANTS else
            "parity (Detectron2's defaults)" if config == PARITY else
            "**plugin best**: " + " + ".join(row["variants"]))


def split_tables(summary: Dict[str, object],
                 label: Callable[[str, Dict[str, object]], str]) -> List[str]:
    """Markdown lines of one table per split of ``summary``: per config (named by
    ``label(config, row)``) its seeds, mask and box AP (mean ± SD) and the paired differences
    to parity with their intervals (bold where the interval excludes 0)."""
    lines: List[str] = []
    for split, part in summary.items():
        lines += ["", f"**{split}** (held-out `{split}_val`; data order identical across "
                      f"configs of a seed: {'yes' if part['same_data_per_seed'] else 'NO'})", "",
                  "| config | seeds | mask AP | Δ mask AP [95% CI] | box AP | Δ box AP [95% CI] |",
                  "|---|---|---|---|---|---|"]
        for config, row in part["rows"].items():
            seeds = ",".join(str(s) for s in row["seeds"])
            cells = []
            for task in ("mask", "box"):
                sd = row[f"{task}_sd"]
                cells.append(f"{row[f'{task}_mean']:.2f}" + (f" ± {sd:.2f}" if sd is not None else ""))
                diff = row.get(f"{task}_diff")
                if diff is None:
                    cells.append("—")
                elif diff["low"] is None:
                    cells.append(f"{diff['mean']:+.2f} (one seed: no interval)")
                else:
                    mark = "**" if diff["low"] > 0 or diff["high"] < 0 else ""
                    cells.append(f"{mark}{diff['mean']:+.2f} [{diff['low']:+.2f}, "
                                 f"{diff['high']:+.2f}]{mark}")
            lines.append(f"| {label(config, row)} | {seeds} | {cells[0]} | {cells[1]} | "
                         f"{cells[2]} | {cells[3]} |")
    return lines


def format_markdown(summary: Dict[str, object], results: Sequence[dict], settings: Settings,
                    best: Sequence[str], command: str, env: Optional[Dict[str, str]] = None,
                    date: Optional[str] = None) -> str:
    env = env or harness.environment()
    date = date or time.strftime("%Y-%m-%d")
    cpu_seconds = sum(r.get("run_seconds", 0.0) for r in results)
    lines = [
        f"Command: `{command}`  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Date: {date}",
        "",
        f"Study: {settings.image_size} px shapes, {settings.num_train} train / {settings.num_val} "
        f"held-out images per split; ResNet-18 + FPN width 64 from scratch, AdamW lr "
        f"{settings.lr:g}, {settings.iters} iterations of {settings.batch} images, "
        f"{settings.precision}; {len(results)} runs, "
        f"{cpu_seconds / 60:.0f} min under the CPU lock in all. "
        f"Plugin best = {' + '.join(best) if best else '(not run)'}.",
        "",
        runs_provenance(results),
    ]
    lines += split_tables(summary, _label)
    lines += ["", "AP: mean ± SD over seeds. Δ: mean of the per-seed differences to the parity "
                  "run of the same seed (same data order, same initial weights outside the "
                  "changed modules), with a 95% Student-t interval on those differences "
                  "(n - 1 degrees of freedom); bold: the interval excludes 0."]
    return "\n".join(lines) + "\n"


def render(payload):
    """The markdown of a results payload (``bench_variants.json``), as ``write_outputs`` writes it."""
    return format_markdown(payload["summary"], payload["runs"], Settings(**payload["settings"]),
                           payload["plugin_best"], payload["command"], payload["environment"],
                           payload["date"])


def plot(summary: Dict[str, object], results: Sequence[dict], folder: str,
         name: str = NAME) -> List[str]:
    """<name>.png (paired differences) and <name>_curves.png (training losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    splits = list(summary)
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 5.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        rows = [(c, r) for c, r in summary[split]["rows"].items() if c != PARITY]
        for i, (config, row) in enumerate(rows):
            y = len(rows) - 1 - i
            for task, color, dy in (("mask", "tab:blue", 0.12), ("box", "tab:orange", -0.12)):
                d = row[f"{task}_diff"]
                if d["low"] is not None:
                    ax.plot([d["low"], d["high"]], [y + dy] * 2, color=color, lw=2)
                ax.plot(d["values"], [y + dy] * len(d["values"]), ".", color=color, alpha=0.4)
                ax.plot([d["mean"]], [y + dy], "o", color=color,
                        label=f"Δ {task} AP (95% CI)" if i == 0 else None)
        ax.axvline(0, color="black", lw=1)
        ax.axvline(1.5, color="gray", lw=1, ls="--", label="goal: +1.5 mask AP")
        ax.set_ylim(-0.6, len(rows) - 0.4)  # rows evenly spaced even when there is one
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([("plugin best" if c == BEST else c) for c, _ in reversed(rows)])
        ax.set_xlabel("difference to parity, paired by seed (AP points)")
        ax.set_title(f"{split}: variant - parity")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(folder, f"{name}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for config in summary[split]["rows"]:
            runs = [r for r in results if r["split"] == split and r["config"] == config]
            if not runs or not runs[0]["curve"]:
                continue
            its = [p[0] for p in runs[0]["curve"]]
            mean = [statistics.fmean(r["curve"][k][1] for r in runs) for k in range(len(its))]
            style = {PARITY: dict(color="black", lw=2), BEST: dict(color="tab:red", lw=2)}
            ax.plot(its, mean, label=config, **style.get(config, dict(lw=0.8, alpha=0.7)))
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (mean over seeds, 10-iteration windows)")
        ax.set_title(split)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(folder, f"{name}_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_outputs(summary, results, settings, best, command, write_results: bool,
                  readme: Optional[str] = None) -> str:
    """The tables (md + json) and pictures; with ``write_results`` into the tracked files."""
    folder = harness.RESULTS_DIR if write_results else harness.OUTPUT_DIR
    os.makedirs(folder, exist_ok=True)
    payload = {"command": command, "environment": harness.environment(),
               "date": time.strftime("%Y-%m-%d"), "provenance": harness.provenance(),
               "settings": settings.key(), "plugin_best": list(best), "summary": summary,
               "cpu_seconds": round(sum(r.get("run_seconds", 0.0) for r in results), 1),
               "runs": [{k: r[k] for k in ("split", "config", "seed", "variants", "metrics",
                                           "train_seconds", "eval_seconds", "run_seconds",
                                           "data_fingerprint", "provenance") if k in r}
                        for r in results]}
    markdown = render(payload)
    write_json_atomic(os.path.join(folder, f"{NAME}.json"), payload)
    with open(os.path.join(folder, f"{NAME}.md"), "w") as f:
        f.write(markdown)
    pictures = plot(summary, results, folder)
    if write_results:  # README's block and any docs page quoting it
        for doc in ([readme] if readme else harness.markdown_files()):
            harness.update_readme_block(doc, NAME, markdown)
    print(f"[{NAME}] written: {os.path.join(folder, NAME)}.{{md,json}}, "
          + ", ".join(os.path.basename(p) for p in pictures)
          + (" and README.md" if write_results else " (--write-results: the tracked files)"),
          flush=True)
    return markdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Settings()
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision,
                   help="bf16: forward under torch.autocast (CPU with AVX512-BF16, or CUDA)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage 1 seeds")
    p.add_argument("--best-seeds", type=int, nargs="*", default=[3, 4, 5, 6],
                   help="stage 2 (plugin best vs parity) seeds, disjoint from --seeds")
    p.add_argument("--best", nargs="*", choices=sorted(VARIANTS),
                   help="fix the plugin-best combination instead of selecting it from stage 1")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="stage 1 splits (every family; the plugin best is selected on these)")
    p.add_argument("--best-splits", nargs="+", choices=SPLITS,
                   help="stage 2 splits (plugin best vs parity; default: --splits)")
    p.add_argument("--configs", nargs="+", choices=[PARITY, *VARIANTS],
                   default=[PARITY, *VARIANTS], help="stage 1 configs")
    p.add_argument("--pilot", action="store_true", help="stage 1 only (schedule tuning)")
    p.add_argument("--report-only", action="store_true", help="no training: tables from files")
    p.add_argument("--lock", default=DEFAULT_LOCK, help="CPU lock file taken per run ('' none)")
    p.add_argument("--data-root", default=os.path.join(REPO, "datasets", "generated", NAME))
    p.add_argument("--runs-dir", help="run files (default: next to the results)")
    harness.add_output_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings(args.iters, args.batch, args.lr, args.image_size, args.num_train,
                        args.num_val, args.precision, args.threads)
    if set(args.seeds) & set(args.best_seeds):
        raise SystemExit("error: --best-seeds must be fresh seeds, disjoint from --seeds")
    folder = harness.RESULTS_DIR if args.write_results else harness.OUTPUT_DIR
    runs_dir = args.runs_dir or os.path.join(folder, f"{NAME}_runs")
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    loaded_from = harness.provenance()  # once: the code this process runs, for every stage

    def run_fn(spec, progress):
        return run_one(spec, settings, args.data_root, progress)

    if args.report_only:
        run_fn = None  # type: ignore[assignment]

    def stage(specs):
        if run_fn is None:
            return [r for r in (load_run(run_path(runs_dir, s), settings, s) for s in specs) if r]
        return execute(specs, settings, runs_dir, run_fn, args.lock, loaded_from)

    results = stage(stage1_specs(args.splits, args.configs, args.seeds))
    best: List[str] = []
    if not args.pilot and args.best_seeds:
        best = list(args.best) if args.best else select_best(summarize(results), args.splits)
        print(f"[{NAME}] plugin best: {' + '.join(best)}", flush=True)
        results += stage(stage2_specs(args.best_splits or args.splits, best, args.best_seeds))
    if not results:
        raise SystemExit(f"error: no finished runs in {runs_dir}")
    summary = summarize(results)
    print(write_outputs(summary, results, settings, best, command, args.write_results))
    return summary


if __name__ == "__main__":
    main()
