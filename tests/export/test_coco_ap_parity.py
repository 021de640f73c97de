"""
The exported results JSON scored by plain pycocotools gives the same AP as Detectron2's
COCOEvaluator on the same predictions. Predictions are made from the ground truth with
perturbations (shifted masks, a missed object, a false positive, random scores), so AP is
far from both 0 and 100 and a wrong category/image id, box format or RLE would change it.
"""
import contextlib
import io
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances, polygons_to_bitmask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpn_plugin import has_compiled_ops
from fpn_plugin.evaluation import COCO_METRICS, build_coco_evaluator, evaluate_coco_results_json
from fpn_plugin.export import (
    StreamingJSONArrayWriter,
    contiguous_to_dataset_ids,
    instances_to_coco_results,
)


def _perturbed_predictions(dataset_dicts, seed=0):
    """One Instances per image, derived from its annotations."""
    rng = np.random.default_rng(seed)
    out = []
    for d in dataset_dicts:
        h, w = d["height"], d["width"]
        masks, classes = [], []
        for k, ann in enumerate(d["annotations"]):
            if k == 1 and d["image_id"] % 2:  # miss an object in some images
                continue
            mask = polygons_to_bitmask(ann["segmentation"], h, w)
            dy, dx = rng.integers(-1, 2, size=2)
            masks.append(np.roll(mask, (dy, dx), axis=(0, 1)))
            cls = ann["category_id"]
            if rng.random() < 0.15:  # sometimes the wrong class
                cls = 1 - cls
            classes.append(cls)
        fp = np.zeros((h, w), dtype=bool)  # a false positive
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        fp[y:y + 12, x:x + 12] = True
        masks.append(fp)
        classes.append(int(rng.integers(0, 2)))

        masks = np.stack(masks)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(rng.uniform(0.3, 1.0, size=len(masks)), dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inst.pred_masks = torch.from_numpy(masks)
        out.append(inst)
    return out


def _plain_pycocotools(gt_json, results_json, iou_type):
    """What anyone does with a results file: loadRes + COCOeval, nothing else."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        ev = COCOeval(gt, gt.loadRes(results_json), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s * 100) if s >= 0 else float("nan") for s in ev.stats[:6]]


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_exported_json_matches_coco_evaluator(coco_dataset, tmp_path):
    name, gt_json, _ = coco_dataset
    dicts = DatasetCatalog.get(name)
    predictions = _perturbed_predictions(dicts)
    to_dataset = contiguous_to_dataset_ids(MetadataCatalog.get(name))
    assert to_dataset == {0: 3, 1: 7}

    results_json = str(tmp_path / "results.json")
    evaluator = build_coco_evaluator(name, str(tmp_path / "eval"), tasks=("bbox", "segm"))
    evaluator.reset()
    with StreamingJSONArrayWriter(results_json) as writer:
        for d, inst in zip(dicts, predictions):
            for record in instances_to_coco_results(inst, d["image_id"], to_dataset):
                writer.write(record)
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    reference = evaluator.evaluate()

    segm_ap = reference["segm"]["AP"]
    assert 20 < segm_ap < 95, segm_ap  # informative: not a trivial 0 or 100

    plain_segm = _plain_pycocotools(gt_json, results_json, "segm")
    plain_bbox = _plain_pycocotools(gt_json, results_json, "bbox")
    # Over all object sizes plain pycocotools equals COCOEvaluator exactly. (For APs/APm/APl
    # COCOEvaluator drops "bbox" so sizes use mask areas; plain loadRes uses box areas.)
    for i, metric in enumerate(("AP", "AP50", "AP75")):
        assert _same(plain_segm[i], reference["segm"][metric]), metric
    for i, metric in enumerate(COCO_METRICS):
        assert _same(plain_bbox[i], reference["bbox"][metric]), metric

    # The plugin's JSON evaluator follows COCOEvaluator's convention on every metric.
    ours = evaluate_coco_results_json(results_json, name)
    for task in ("bbox", "segm"):
        for metric in COCO_METRICS:
            assert _same(ours[task][metric], reference[task][metric]), (task, metric)


def test_compiled_cocoeval_gives_the_ap_of_pycocotools(coco_dataset, tmp_path):
    """Where Detectron2's compiled ops exist (a source build, e.g. of main), build_coco_evaluator
    picks Detectron2's fast C++ COCOeval; it gives every metric of pycocotools' COCOeval."""
    if not has_compiled_ops():
        pytest.skip("needs Detectron2's compiled ops (detectron2._C); this installation has the "
                    "placeholder, so build_coco_evaluator uses pycocotools' COCOeval")
    name = coco_dataset[0]
    dicts = DatasetCatalog.get(name)
    predictions = _perturbed_predictions(dicts)
    fast = build_coco_evaluator(name, str(tmp_path / "fast"))
    assert fast._use_fast_impl
    official = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=True,
                             output_dir=str(tmp_path / "official"), use_fast_impl=False)
    results = []
    for evaluator in (fast, official):
        evaluator.reset()
        for d, inst in zip(dicts, predictions):
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        results.append(evaluator.evaluate())
    fast_results, official_results = results
    assert 20 < official_results["segm"]["AP"] < 95  # informative: not a trivial 0 or 100
    for task in ("bbox", "segm"):
        for metric in COCO_METRICS:
            assert _same(fast_results[task][metric], official_results[task][metric]), \
                (task, metric)


def test_results_records_are_coco_format(coco_dataset):
    name, _, _ = coco_dataset
    d = DatasetCatalog.get(name)[0]
    inst = _perturbed_predictions([d])[0]
    records = instances_to_coco_results(inst, d["image_id"], {0: 3, 1: 7})
    assert len(records) == len(inst)
    r = records[0]
    assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert r["image_id"] == d["image_id"] and r["category_id"] in (3, 7)
    x0, y0, x1, y1 = inst.pred_boxes.tensor[0].tolist()
    assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert r["segmentation"]["size"] == [d["height"], d["width"]]
    assert isinstance(r["segmentation"]["counts"], str)
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        instances_to_coco_results(inst, d["image_id"], {0: 3})
