"""Safe checkpoint loading: weights load, code in a file never runs, bad files give clear errors."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fpn_plugin.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    SafeDetectionCheckpointer,
    load_checkpoint_file,
    load_model_weights,
)


class _Net(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.conv = nn.Conv2d(3, hidden, 3)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc = nn.Linear(hidden, 2)


def _randomized(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


class _RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_roundtrip_and_extra_data(tmp_path):
    src, dst = _randomized(_Net(), 1), _randomized(_Net(), 2)
    path = str(tmp_path / "model.pth")
    torch.save({"model": src.state_dict(), "iteration": 7}, path)
    extra = load_model_weights(dst, path)
    _assert_same_weights(src, dst)
    assert extra["iteration"] == 7


def test_bare_state_dict_and_numpy_pth(tmp_path):
    src = _randomized(_Net(), 1)
    bare = str(tmp_path / "bare.pth")
    torch.save(src.state_dict(), bare)
    dst = _randomized(_Net(), 2)
    load_model_weights(dst, bare)
    _assert_same_weights(src, dst)

    as_numpy = str(tmp_path / "numpy.pth")
    torch.save({"model": {k: v.numpy() for k, v in src.state_dict().items()}}, as_numpy)
    dst = _randomized(_Net(), 3)
    load_model_weights(dst, as_numpy)
    _assert_same_weights(src, dst)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_model_zoo_pkl_of_numpy_arrays(tmp_path, protocol):
    # Detectron2's model zoo .pkl: {"model": {name: ndarray}, "__author__": ...}
    src = _randomized(_Net(), 1)
    path = str(tmp_path / "zoo.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in src.state_dict().items()},
                     "__author__": "test"}, f, protocol=protocol)
    dst = _randomized(_Net(), 2)
    load_model_weights(dst, path)
    _assert_same_weights(src, dst)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_code_in_checkpoint_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    path = str(tmp_path / ("evil" + suffix))
    payload = {"model": {"fc.weight": _RunsCode(marker)}, "__author__": "x"}
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="other than weights") as info:
        load_model_weights(_Net(), path)
    assert path in str(info.value)
    assert "system" in str(info.value)  # names the refused global
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_corrupt_checkpoint_names_the_file(tmp_path, suffix):
    path = str(tmp_path / ("corrupt" + suffix))
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(2048))
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint") as info:
        load_model_weights(_Net(), path)
    assert path in str(info.value)


def test_truncated_and_empty_checkpoints(tmp_path):
    good = str(tmp_path / "good.pth")
    torch.save({"model": _Net().state_dict()}, good)
    data = open(good, "rb").read()
    for name, content in [("truncated.pth", data[: len(data) // 2]), ("empty.pth", b"")]:
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match=name):
            load_model_weights(_Net(), path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not found") as info:
        load_model_weights(_Net(), path)
    assert path in str(info.value)


def test_mismatch_names_file_and_first_keys(tmp_path):
    path = str(tmp_path / "small.pth")
    state = _Net(hidden=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_model_weights(_Net(hidden=8), path)
    err = info.value
    msg = str(err)
    assert path in msg
    assert "fc.bias" in err.missing_keys and "fc.bias" in msg
    assert err.unexpected_keys == ["extra.weight"] and "extra.weight" in msg
    shapes = {k: (tuple(a), tuple(b)) for k, a, b in err.incorrect_shapes}
    assert shapes["conv.weight"] == ((4, 3, 3, 3), (8, 3, 3, 3))
    assert "conv.weight (checkpoint (4, 3, 3, 3) vs model (8, 3, 3, 3))" in msg
    # A misshapen key is reported once, as a shape mismatch, not also as missing.
    assert "conv.weight" not in err.missing_keys


def test_non_strict_loading_keeps_detectron2_behaviour(tmp_path):
    # Fine-tuning: a checkpoint with fewer keys loads what fits and does not raise.
    src = _randomized(_Net(), 1)
    state = {k: v for k, v in src.state_dict().items() if k.startswith("conv.")}
    path = str(tmp_path / "partial.pth")
    torch.save({"model": state}, path)
    dst = _randomized(_Net(), 2)
    load_model_weights(dst, path, strict=False)
    torch.testing.assert_close(dst.conv.weight, src.conv.weight)
    with pytest.raises(CheckpointMismatchError, match="fc.weight"):
        load_model_weights(_randomized(_Net(), 2), path, strict=True)


def test_non_tensor_entries_are_rejected(tmp_path):
    path = str(tmp_path / "strings.pth")
    torch.save({"model": {"fc.weight": "not a tensor"}}, path)
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_model_weights(_Net(), path)


def test_checkpointer_save_resume_with_optimizer(tmp_path):
    """Training code can swap DetectionCheckpointer for the safe one: save + resume work."""
    model = _randomized(_Net(), 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.fc.weight.sum().backward()
    opt.step()
    SafeDetectionCheckpointer(model, str(tmp_path), optimizer=opt).save("model_0000009",
                                                                        iteration=9)
    model2 = _randomized(_Net(), 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ck = SafeDetectionCheckpointer(model2, str(tmp_path), optimizer=opt2)
    extra = ck.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    _assert_same_weights(model, model2)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_load_checkpoint_file_returns_plain_data(tmp_path):
    path = str(tmp_path / "x.pth")
    torch.save({"model": {"a": torch.ones(2)}, "iteration": 1}, path)
    data = load_checkpoint_file(path)
    assert data["iteration"] == 1 and torch.equal(data["model"]["a"], torch.ones(2))


def test_torch_without_weights_only_is_refused_not_unpickled(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pth")
    torch.save({"model": _Net().state_dict()}, path)

    def old_torch_load(f, map_location=None):  # torch < 1.13 signature
        pytest.fail("a full unpickle must never be attempted")

    monkeypatch.setattr(torch, "load", old_torch_load)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint_file(path)
