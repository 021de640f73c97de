"""
COCO evaluation that works with and without Detectron2's compiled ops.

``build_coco_evaluator`` returns Detectron2's ``COCOEvaluator``, choosing the fast (compiled)
COCOeval only where ``detectron2._C`` is a real build. ``evaluate_coco_results_json`` scores a
results JSON written by ``fpn_plugin.export`` with plain pycocotools, the same way
``COCOEvaluator`` does, so large exports can be evaluated without holding predictions twice.
"""
import contextlib
import copy
import io
import json
import logging
from typing import Dict, Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from ..utils import env

__all__ = [
    "COCO_METRICS",
    "build_coco_evaluator",
    "check_dataset_registered",
    "evaluate_coco_results_json",
]

logger = logging.getLogger(__name__)

_TASKS = ("bbox", "segm", "keypoints")
# Names of COCOeval.stats[0:6] as Detectron2 reports them (percent).
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def check_dataset_registered(dataset_name: str) -> None:
    """
    Raise a ``ValueError`` naming ``dataset_name`` and the registered datasets if it is not in
    Detectron2's ``DatasetCatalog``.
    """
    registered = DatasetCatalog.list()
    if dataset_name not in registered:
        shown = ", ".join(sorted(registered)[:15])
        raise ValueError(
            f"dataset {dataset_name!r} is not registered in Detectron2's DatasetCatalog "
            f"(register it first, e.g. with detectron2.data.datasets.register_coco_instances). "
            f"Registered: {shown}{', ...' if len(registered) > 15 else ''}"
        )


def _check_tasks(tasks: Iterable[str]) -> tuple:
    tasks = tuple(tasks)
    if not tasks or any(t not in _TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {_TASKS}, got {tasks!r}")
    return tasks


def build_coco_evaluator(dataset_name: str, output_dir: Optional[str],
                         tasks: Sequence[str] = ("bbox", "segm"), *, distributed: bool = True,
                         max_dets_per_image: Optional[int] = None) -> COCOEvaluator:
    """
    Detectron2's ``COCOEvaluator`` for a registered dataset, usable with or without
    Detectron2's compiled extension.

    Args:
        dataset_name (str): a name registered in ``DatasetCatalog`` (COCO-format metadata
            ``json_file``, or any Detectron2 dataset, which COCOEvaluator converts into
            ``output_dir``).
        output_dir (str or None): where COCOEvaluator writes ``coco_instances_results.json``
            and ``instances_predictions.pth``; None writes nothing.
        tasks (sequence[str]): subset of ("bbox", "segm", "keypoints").
        distributed (bool): gather predictions from all workers (harmless in one process).
        max_dets_per_image (int or None): COCOeval's detection limit; None is COCO's 100.

    Returns:
        COCOEvaluator: with ``use_fast_impl=fpn_plugin.has_compiled_ops()``. The fast
        implementation calls ``detectron2._C``; without a compiled build the official
        pycocotools COCOeval is used, which gives the same numbers (slower).
    """
    check_dataset_registered(dataset_name)
    tasks = _check_tasks(tasks)
    return COCOEvaluator(
        dataset_name,
        tasks=tasks,
        distributed=distributed,
        output_dir=output_dir,
        max_dets_per_image=max_dets_per_image,
        use_fast_impl=env.has_compiled_ops(),
    )


def evaluate_coco_results_json(results, dataset_name: Optional[str] = None, *,
                               gt_json: Optional[str] = None,
                               tasks: Sequence[str] = ("bbox", "segm")
                               ) -> Dict[str, Dict[str, float]]:
    """
    Score COCO-format results with plain pycocotools, following ``COCOEvaluator``'s conventions.

    As in ``COCOEvaluator``, segm results are scored without their "bbox" field, so
    small/medium/large use the mask area (pycocotools would otherwise use the box area),
    and every image of the ground truth is evaluated. A record's "mask_score" (written for a
    ``MaskScoringHead`` model) replaces its "score" for segm; bbox keeps "score".

    Args:
        results (str or list[dict]): path of a results JSON (e.g. ``coco_instances_results.json``
            from ``fpn_plugin.export``) or the loaded list. Category ids are the dataset's.
        dataset_name (str): a registered dataset whose metadata has ``json_file``; or
        gt_json (str): the ground-truth COCO JSON directly.
        tasks (sequence[str]): subset of ("bbox", "segm"). COCO's limit of 100 detections per
            image applies, as in ``COCOEvaluator`` by default.

    Returns:
        dict: task -> {"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent (NaN where COCOeval
        reports -1), the same keys and scale as COCOEvaluator's results.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    tasks = _check_tasks(tasks)
    if "keypoints" in tasks:
        raise ValueError("evaluate_coco_results_json supports tasks 'bbox' and 'segm'")
    if (dataset_name is None) == (gt_json is None):
        raise ValueError("pass exactly one of dataset_name and gt_json")
    if dataset_name is not None:
        check_dataset_registered(dataset_name)
        gt_json = MetadataCatalog.get(dataset_name).get("json_file")
        if gt_json is None:
            raise ValueError(f"dataset {dataset_name!r} has no COCO json_file in its metadata; "
                             "use build_coco_evaluator, which converts it")
    if isinstance(results, str):
        with open(results) as f:
            results = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_json)

    metrics: Dict[str, Dict[str, float]] = {}
    for task in tasks:
        dets: List[dict] = results
        if task == "segm":
            dets = copy.deepcopy(results)
            for d in dets:
                d.pop("bbox", None)
                if "mask_score" in d:  # MaskScoringHead's mask results (fpn_plugin.export)
                    d["score"] = d.pop("mask_score")
        if not dets:
            metrics[task] = {m: float("nan") for m in COCO_METRICS}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
            coco_eval = COCOeval(coco_gt, coco_dt, task)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics[task] = {
            name: float(coco_eval.stats[i] * 100) if coco_eval.stats[i] >= 0 else float("nan")
            for i, name in enumerate(COCO_METRICS)
        }
        logger.info("pycocotools %s: %s", task, metrics[task])
    return metrics
