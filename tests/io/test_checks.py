"""
fpn_plugin.data.checks: the config against the data, the processes, the device and the
checkpoint being resumed, checked before anything is written (each error names the key).
"""
import argparse
import os

import pytest
import torch
from demo_testutils import DEMO_CONFIG, LAZY_DEMO_CONFIG
from detectron2.data import MetadataCatalog

from fpn_plugin.config import load_config
from fpn_plugin.data.checks import (
    check_before_setup,
    check_config_against_data,
    check_lazy_run_config,
    check_run_config,
)
from fpn_plugin.engine.lazy import load_lazy_config
from fpn_plugin.engine.setup import default_setup


def _cfg(tmp_path, *opts):
    return load_config(DEMO_CONFIG, ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu",
                                     *opts], freeze=False)


def _args(**kw):
    return argparse.Namespace(resume=kw.get("resume", False), eval_only=kw.get("eval_only", False),
                              config_file=DEMO_CONFIG, opts=[])


def test_batch_not_divisible_by_the_processes(tmp_path):
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH 3 is not divisible by the 2"):
        check_run_config(_cfg(tmp_path, "SOLVER.IMS_PER_BATCH", "3"), num_processes=2)
    check_run_config(_cfg(tmp_path, "SOLVER.IMS_PER_BATCH", "4"), num_processes=2)


def test_checkpoint_period_zero(tmp_path):
    with pytest.raises(ValueError, match="SOLVER.CHECKPOINT_PERIOD"):
        check_run_config(_cfg(tmp_path, "SOLVER.CHECKPOINT_PERIOD", "0"), num_processes=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="MODEL.DEVICE='cuda' but CUDA is not available"):
        check_run_config(_cfg(tmp_path, "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "False"),
                         num_processes=1)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ValueError, match="OUTPUT_DIR .* is an existing file"):
        default_setup(_cfg(tmp_path), _args())
    assert (tmp_path / "out").read_text() == "mine"


def test_lazy_total_batch_size_zero(tmp_path):
    cfg = load_lazy_config(LAZY_DEMO_CONFIG, ["dataloader.train.total_batch_size=0"])
    with pytest.raises(ValueError, match="dataloader.train.total_batch_size must be"):
        check_lazy_run_config(cfg, num_processes=1)
    cfg = load_lazy_config(LAZY_DEMO_CONFIG, ["dataloader.train.total_batch_size=3"])
    with pytest.raises(ValueError, match="not divisible by the 2"):
        check_lazy_run_config(cfg, num_processes=2)


def test_resume_with_changed_classes_fails_before_config_yaml_is_rewritten(tmp_path):
    old = _cfg(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(old.dump())
    (out / "last_checkpoint").write_text("model_0000004.pth")
    before = (out / "config.yaml").read_text()
    new = _cfg(tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "7", "MODEL.FPN.FUSE_TYPE", "avg")
    with pytest.raises(ValueError, match=r"cannot resume.*MODEL.FPN.FUSE_TYPE: 'weighted' -> 'avg'.*"
                                         r"MODEL.ROI_HEADS.NUM_CLASSES: 4 -> 7"):
        default_setup(new, _args(resume=True))
    assert (out / "config.yaml").read_text() == before
    # Where the weights come from and the device may change on resume.
    check_before_setup(_cfg(tmp_path, "MODEL.WEIGHTS", "x.pth"), _args(resume=True))


def test_eval_only_classes_against_the_test_set(tmp_path):
    cfg = _cfg(tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "6")
    with pytest.raises(ValueError, match="NUM_CLASSES is 6 but the evaluation set 'shapes_val' "
                                         "has 4 classes"):
        check_before_setup(cfg, _args(eval_only=True))


@pytest.fixture
def dataset_with_classes():
    name = "checks_test_dataset"
    MetadataCatalog.get(name).thing_classes = ["a", "b", "c"]
    yield name
    MetadataCatalog.remove(name)


def test_num_classes_against_the_training_classes(tmp_path, dataset_with_classes, caplog):
    records = [{"file_name": "x.jpg", "image_id": 1,
                "annotations": [{"category_id": 2, "segmentation": [[0, 0, 1, 0, 1, 1]]}]}]
    cfg = _cfg(tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "2")
    cfg.DATASETS.TRAIN = (dataset_with_classes,)
    with pytest.raises(ValueError, match="NUM_CLASSES is 2 but the training set "
                                         "'checks_test_dataset' has 3 classes"):
        check_config_against_data(cfg, records)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    with caplog.at_level("WARNING", logger="fpn_plugin"):
        check_config_against_data(cfg, records)
    assert "2 output(s) will never see an example" in caplog.text


def test_rle_masks_with_the_polygon_mask_format(tmp_path):
    records = [{"file_name": "r.jpg", "image_id": 9, "annotations": [
        {"category_id": 0, "segmentation": {"size": [4, 4], "counts": "abc"}}]}]
    cfg = _cfg(tmp_path)
    cfg.DATASETS.TRAIN = ()
    with pytest.raises(ValueError, match=r"INPUT.MASK_FORMAT is 'polygon' but 'r.jpg' \(image id "
                                         r"9, annotation 0\) has an RLE mask"):
        check_config_against_data(cfg, records)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    check_config_against_data(cfg, records)
