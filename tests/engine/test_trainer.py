"""fpn_plugin.engine.Trainer: record validation reaches the metrics, AMP is checked up front,
and the training curve is drawn; plotting reads resumed metrics correctly."""
import json
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.data.shapes import register_shapes_dataset
from fpn_plugin.engine import Trainer, check_amp_config, plot_training_curve, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
# The demo model at 64 px with narrow heads: a training step takes a fraction of a second.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]


def tiny_cfg(output_dir, train, test=(), max_iter=2):
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.merge_from_file(DEMO_CONFIG)
    cfg.merge_from_list(TINY_OPTS)
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Registered tiny shapes splits, and a training set with one missing image."""
    root = tmp_path_factory.mktemp("engine_shapes")
    prefix = f"engine_shapes_{os.getpid()}"
    train, val = register_shapes_dataset(str(root), prefix=prefix, num_train=4, num_val=2,
                                         image_size=64)
    broken = f"{prefix}_broken"

    def load_broken():
        records = [dict(r) for r in DatasetCatalog.get(train)]
        records[0]["file_name"] = str(root / "train" / "gone.jpg")
        return records

    DatasetCatalog.register(broken, load_broken)
    DatasetCatalog.get(train)
    MetadataCatalog.get(broken).thing_classes = MetadataCatalog.get(train).thing_classes
    yield {"train": train, "val": val, "broken": broken}
    for n in (train, val, broken):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_skipped_records_are_counted_in_metrics_and_listed(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["broken"]])
    trainer = Trainer(cfg)
    assert len(trainer.invalid_records) == 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = read_metrics(str(tmp_path / "metrics.json"))
    counts = [r["data/invalid_records_skipped"] for r in rows if "data/invalid_records_skipped" in r]
    assert counts == [1]
    with open(tmp_path / "invalid_records.json") as f:
        listed = json.load(f)
    assert [os.path.basename(p["file_name"]) for p in listed] == ["gone.jpg"]
    assert "missing" in listed[0]["reason"]
    assert os.path.isfile(tmp_path / "training_curve.png")
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_error_policy_refuses_before_training(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["broken"]])
    cfg.DATALOADER.INVALID_RECORDS = "error"
    with pytest.raises(ValueError, match="gone.jpg"):
        Trainer(cfg)
    cfg.DATALOADER.INVALID_RECORDS = "ignore"
    with pytest.raises(ValueError, match="DATALOADER.INVALID_RECORDS"):
        Trainer(cfg)


def test_bad_test_set_images_are_caught_before_training(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["train"]], test=[datasets["broken"]])
    cfg.DATALOADER.INVALID_RECORDS = "error"
    with pytest.raises(ValueError, match="gone.jpg"):
        Trainer(cfg)
    assert not os.path.exists(tmp_path / "last_checkpoint")


def test_amp_on_cpu_is_refused_with_the_config_key(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["train"]])
    check_amp_config(cfg)  # AMP off: fine anywhere
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match=r"SOLVER.AMP.ENABLED=True needs a CUDA device.*'cpu'"):
        Trainer(cfg)


def test_read_metrics_keeps_the_resumed_history(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [
        {"iteration": 0, "data/invalid_records_skipped": 0},
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 39, "total_loss": 2.0},
        {"iteration": 59, "total_loss": 1.5},  # the killed run got here, after checkpoint 49
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"iteration": 6'  # cut mid-write
    resumed = [{"iteration": 50, "data/invalid_records_skipped": 0},
               {"iteration": 59, "total_loss": 1.4},
               {"iteration": 79, "total_loss": 1.0, "segm/AP": 50.0}]
    text += "\n" + "".join(json.dumps(x) + "\n" for x in resumed)
    path.write_text(text)
    rows = read_metrics(str(path))
    assert [r["iteration"] for r in rows] == [0, 19, 39, 50, 59, 79]
    assert rows[4]["total_loss"] == 1.4
    out = plot_training_curve(str(path), str(tmp_path / "curve.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_optimizer_choice(tmp_path):
    import torch
    from detectron2.modeling import build_model

    from fpn_plugin.engine.trainer import build_optimizer_for

    cfg = tiny_cfg(tmp_path, [])
    model = build_model(cfg)
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"  # the demo's choice
    opt = build_optimizer_for(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    # Detectron2's parameter groups: norm layers get SOLVER.WEIGHT_DECAY_NORM (0).
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, cfg.SOLVER.WEIGHT_DECAY}
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(build_optimizer_for(cfg, model), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER .*'LAMB'"):
        build_optimizer_for(cfg, model)


def test_checkpoint_holds_optimizer_state_and_resume_restores_it(tmp_path, datasets):
    import torch

    cfg = tiny_cfg(tmp_path, [datasets["train"]], max_iter=3)
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2
    moments = saved["trainer"]["_trainer"]["optimizer"]["state"]
    assert moments and all("exp_avg" in v for v in moments.values())  # AdamW moments kept

    cfg.SOLVER.MAX_ITER = 4
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    state = resumed.optimizer.state_dict()["state"]
    key = next(iter(moments))
    assert torch.equal(state[key]["exp_avg"], moments[key]["exp_avg"])
