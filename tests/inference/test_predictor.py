"""fpn_plugin.inference.predictor.Predictor: refuses a device or weights file that cannot work
before the model is built, and predicts what the model gives for the test-time resized image
(the weights loaded as saved)."""
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from model_testutils import tiny_mask_rcnn_cfg

from fpn_plugin.checkpoint import CheckpointError
from fpn_plugin.inference import predictor as predictor_module
from fpn_plugin.inference.predictor import Predictor


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(predictor_module, "build_model",
                        lambda cfg: pytest.fail("the model was built"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_device_without_cuda_is_refused_naming_the_key(tmp_path, no_model):
    cfg = tiny_mask_rcnn_cfg()
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda' but CUDA is not available"):
        Predictor(cfg, str(tmp_path / "any.pth"))


def test_missing_weights_are_refused_naming_the_file(tmp_path, no_model):
    cfg = tiny_mask_rcnn_cfg()
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not found") as info:
        Predictor(cfg, missing)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="no weights"):
        Predictor(cfg)  # MODEL.WEIGHTS is empty


def test_predicts_what_the_model_gives_for_the_resized_image(tmp_path):
    cfg = tiny_mask_rcnn_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = str(tmp_path / "w.pth")
    torch.save({"model": model.state_dict()}, path)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)

    predictor = Predictor(cfg, path)
    assert not predictor.model.training and predictor.weights == path
    got = predictor(image)["instances"]

    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    with torch.no_grad():
        want = model([{"image": torch.as_tensor(resized.transpose(2, 0, 1).copy()),
                       "height": 50, "width": 70}])[0]["instances"]
    assert got.image_size == (50, 70)
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.scores, want.scores)
