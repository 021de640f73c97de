"""
fpn_plugin.io.checkpoints (fpn_plugin.checkpoint): a last_checkpoint naming a file outside
the output folder is never followed; evaluation loads strictly (an empty or partial 'model'
is refused naming the file and the keys) unless the path says ``?strict=False``.
"""
import pytest
import torch
from torch import nn

from fpn_plugin.io import CheckpointError, CheckpointMismatchError, SafeDetectionCheckpointer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)


def _save(folder, name, model, iteration):
    ck = SafeDetectionCheckpointer(model, str(folder))
    ck.save(name, iteration=iteration)


def test_last_checkpoint_outside_the_folder_is_not_followed(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _save(elsewhere, "model", _Net(), 99)
    _save(out, "model_0000004", _Net(), 4)
    (out / "last_checkpoint").write_text("../elsewhere/model.pth")
    extra = SafeDetectionCheckpointer(_Net(), str(out)).resume_or_load("", resume=True)
    assert extra["iteration"] == 4  # the intact one inside, not ../elsewhere's 99


@pytest.mark.parametrize("named", ["../elsewhere/model.pth", "/abs/model.pth"])
def test_last_checkpoint_outside_alone_is_an_error_naming_it(tmp_path, named):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text(named)
    with pytest.raises(CheckpointError, match=r"not a file in .*never followed"):
        SafeDetectionCheckpointer(_Net(), str(out)).resume_or_load("", resume=True)


def test_strict_loading_refuses_an_empty_model_unless_asked(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"model": {}}, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"empty\.pth.*fc\.weight"):
        SafeDetectionCheckpointer(_Net(), strict=True).load(str(path))
    SafeDetectionCheckpointer(_Net(), strict=True).load(f"{path}?strict=False")


def test_a_refused_file_raises_before_detectron2s_loader_starts(tmp_path, monkeypatch):
    """Detectron2 main's loader keeps the URL it is loading until it returns and refuses to
    start another load meanwhile; a file the safe reader refuses must therefore raise before
    that loader runs, so the same checkpointer can load the next candidate (resume)."""
    from detectron2.checkpoint import DetectionCheckpointer

    entered = []
    original = DetectionCheckpointer.load

    def spy(self, *args, **kwargs):
        entered.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DetectionCheckpointer, "load", spy)
    _save(tmp_path, "good", _Net(), 7)
    bad = tmp_path / "bad.pth"
    bad.write_bytes((tmp_path / "good.pth").read_bytes()[:100])
    ck = SafeDetectionCheckpointer(_Net(), str(tmp_path))
    with pytest.raises(CheckpointError, match="bad.pth"):
        ck.load(str(bad))
    assert entered == []
    assert ck.load(str(tmp_path / "good.pth"))["iteration"] == 7
    assert len(entered) == 1
