"""Evaluation helpers: Detectron2's COCOEvaluator set up for builds with or without compiled ops."""
from .coco import (
    COCO_METRICS,
    build_coco_evaluator,
    check_dataset_registered,
    evaluate_coco_results_json,
)

__all__ = [
    "COCO_METRICS",
    "build_coco_evaluator",
    "check_dataset_registered",
    "evaluate_coco_results_json",
]
