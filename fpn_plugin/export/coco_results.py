"""
Predicted ``Instances`` -> COCO result records (the format pycocotools' ``loadRes`` reads).

The records are exactly what Detectron2's ``COCOEvaluator`` scores: Detectron2's own
``instances_to_coco_json`` encodes them (bbox as XYWH, mask as RLE with ``counts`` as str), and
category ids are mapped back from the model's contiguous ids to the dataset's ids the same way
the evaluator does. So a results file evaluated by plain pycocotools and the evaluator agree.
"""
from typing import Dict, List, Optional

from detectron2.evaluation.coco_evaluation import instances_to_coco_json

__all__ = ["contiguous_to_dataset_ids", "instances_to_coco_results"]


def contiguous_to_dataset_ids(metadata) -> Optional[Dict[int, int]]:
    """
    The inverse of ``metadata.thing_dataset_id_to_contiguous_id`` (set by Detectron2's COCO
    loader and builtin datasets), or None when the metadata has no such mapping (then
    records keep the model's contiguous ids).

    Args:
        metadata: a Detectron2 ``Metadata``.
    """
    mapping = metadata.get("thing_dataset_id_to_contiguous_id") if metadata is not None else None
    if not mapping:
        return None
    return {int(v): int(k) for k, v in mapping.items()}


def instances_to_coco_results(instances, image_id, contiguous_to_dataset: Optional[Dict[int, int]]
                              = None) -> List[dict]:
    """
    Convert one image's predictions to COCO result records.

    Args:
        instances (Instances): on CPU, with ``pred_boxes`` (N, 4) XYXY absolute, ``scores`` (N,),
            ``pred_classes`` (N,) contiguous ids in [0, K), and optionally ``pred_masks``
            (N, H, W) at the image's original size and ``mask_scores`` (N,) (set by
            ``MaskScoringHead``).
        image_id (int): the dataset's image id.
        contiguous_to_dataset (dict[int, int] or None): from :func:`contiguous_to_dataset_ids`.

    Returns:
        list[dict]: N records with "image_id", "category_id", "bbox" [x, y, w, h], "score",
        and "segmentation" (RLE dict: "size" [H, W], "counts" str) when masks are present.
        With ``mask_scores`` and masks, also "mask_score": the score of the "segm" result
        ("score" stays the box score; ``fpn_plugin.evaluation.evaluate_coco_results_json``
        scores "segm" with "mask_score" where a record has one).

    Raises:
        ValueError: a predicted class has no dataset id (model and dataset class counts differ).
    """
    records = instances_to_coco_json(instances, image_id)
    if instances.has("mask_scores") and instances.has("pred_masks"):
        for record, mask_score in zip(records, instances.mask_scores.tolist()):
            record["mask_score"] = mask_score
    if contiguous_to_dataset is not None:
        for record in records:
            cls = record["category_id"]
            if cls not in contiguous_to_dataset:
                raise ValueError(
                    f"predicted class {cls} has no category in the dataset, which has "
                    f"{len(contiguous_to_dataset)} classes; MODEL.ROI_HEADS.NUM_CLASSES must "
                    "match the dataset"
                )
            record["category_id"] = contiguous_to_dataset[cls]
    return records
