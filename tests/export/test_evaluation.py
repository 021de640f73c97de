"""build_coco_evaluator picks the COCOeval implementation the installation can run."""
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks

import fpn_plugin
from fpn_plugin.evaluation import build_coco_evaluator, evaluate_coco_results_json
from fpn_plugin.utils import env


def test_fast_impl_follows_compiled_ops(coco_dataset, tmp_path):
    evaluator = build_coco_evaluator(coco_dataset[0], str(tmp_path))
    assert evaluator._use_fast_impl == fpn_plugin.has_compiled_ops()
    assert tuple(evaluator._tasks) == ("bbox", "segm")


@pytest.mark.parametrize("compiled", [True, False])
def test_fast_impl_switch(coco_dataset, tmp_path, monkeypatch, compiled):
    monkeypatch.setattr(env, "has_compiled_ops", lambda: compiled)
    evaluator = build_coco_evaluator(coco_dataset[0], str(tmp_path), tasks=("segm",))
    assert evaluator._use_fast_impl is compiled


def test_evaluates_without_compiled_ops(coco_dataset, tmp_path):
    """Here detectron2._C is the placeholder: evaluation must still run (official COCOeval)."""
    if fpn_plugin.has_compiled_ops():
        pytest.skip("this installation has Detectron2's compiled ops")
    name = coco_dataset[0]
    evaluator = build_coco_evaluator(name, str(tmp_path))
    evaluator.reset()
    for d in DatasetCatalog.get(name):  # perfect predictions from the ground truth
        inst = Instances((d["height"], d["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in d["annotations"]]
        polys = PolygonMasks([a["segmentation"] for a in d["annotations"]])
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        inst.pred_masks = BitMasks.from_polygon_masks(polys, d["height"], d["width"]).tensor
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] > 90  # rasterized polygons vs polygons: near, not exactly, 100


def test_bad_arguments(coco_dataset, tmp_path):
    with pytest.raises(ValueError, match="'missing_ds' is not registered"):
        build_coco_evaluator("missing_ds", str(tmp_path))
    with pytest.raises(ValueError, match="tasks"):
        build_coco_evaluator(coco_dataset[0], str(tmp_path), tasks=("boxes",))
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_coco_results_json([], None)
