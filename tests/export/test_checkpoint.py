"""Safe checkpoint loading: weights load, code in a file never runs, bad files give clear errors."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from hostile_testutils import RunsCode as _RunsCode

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
    # The optimizer state is restored value for value (momentum buffers, hyper-parameters) ...
    saved, restored = opt.state_dict(), opt2.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert restored["state"].keys() == saved["state"].keys() and saved["state"]
    for index, state in saved["state"].items():
        assert state.keys() == restored["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
            assert value.abs().sum() > 0, (index, key)  # a real momentum, not zeros
    # ... so the resumed run continues exactly as the original would have.
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        (m.fc.weight.sum() + m.conv.weight.square().sum()).backward()
        o.step()
    _assert_same_weights(model, model2)


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


# -- paths: Detectron2 main's query suffix and detectron2:// URLs -------------------------------

class _Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _Net()


def test_matching_heuristics_query_is_honoured_on_a_local_pth(tmp_path):
    """`model.pth?matching_heuristics=True` (Detectron2 main's syntax) loads with the name-matching
    heuristics on v0.6 too; without the query the same file is a strict mismatch."""
    src = _randomized(_Net(), 1)
    path = str(tmp_path / "bare_names.pth")
    torch.save({"model": src.state_dict()}, path)  # "conv.weight" vs the model's "net.conv.weight"
    with pytest.raises(CheckpointMismatchError):
        load_model_weights(_Wrapped(), path, strict=True)
    dst = _randomized(_Wrapped(), 2)
    SafeDetectionCheckpointer(dst).load(path + "?matching_heuristics=True")
    _assert_same_weights(src, dst.net)


def test_unknown_query_option_is_an_error_naming_it(tmp_path):
    path = str(tmp_path / "m.pth")
    torch.save({"model": _Net().state_dict()}, path)
    with pytest.raises(CheckpointError, match="unsupported query option colour"):
        load_model_weights(_Net(), path + "?colour=red")


def test_detectron2_url_with_query_loads_through_the_path_manager(tmp_path, monkeypatch):
    """A detectron2:// model-zoo URL with the query suffix resolves through Detectron2's own
    path handlers (the download cache is pre-filled, so nothing is fetched)."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    src = _randomized(_Net(), 1)
    cached = tmp_path / "cache" / "detectron2" / "Zoo" / "123"
    cached.mkdir(parents=True)
    with open(cached / "model_final_abc.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in src.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo"}, f)
    dst = _randomized(_Net(), 2)
    SafeDetectionCheckpointer(dst).load(
        "detectron2://Zoo/123/model_final_abc.pkl?matching_heuristics=True")
    _assert_same_weights(src, dst)


def test_refused_pth_names_the_file_and_the_object(tmp_path):
    """A .pth that torch's weights-only loader refuses (here: a config object saved with the
    weights) is named, with the object that was refused, not torch's advice to unpickle it."""
    from detectron2.config import get_cfg

    path = str(tmp_path / "with_cfg.pth")
    torch.save({"model": _Net().state_dict(), "cfg": get_cfg()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(_Net(), path)
    message = str(info.value)
    assert path in message and "CfgNode" in message
    assert "weights_only` set to `False`" not in message


# -- saving and resuming ---------------------------------------------------------------------

def _train_one_step(model, opt):
    model.fc.weight.sum().backward()
    opt.step()


def _checkpointer_with_history(tmp_path, iterations=(4, 9)):
    model = _randomized(_Net(), 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = SafeDetectionCheckpointer(model, str(tmp_path), optimizer=opt)
    states = {}
    for it in iterations:
        _train_one_step(model, opt)
        ck.save(f"model_{it:07d}", iteration=it)
        states[it] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    model = _Net()
    ck = SafeDetectionCheckpointer(model, str(tmp_path))
    ck.save("model_0000004", iteration=4)
    before = open(tmp_path / "model_0000004.pth", "rb").read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000004", iteration=9)
    assert open(tmp_path / "model_0000004.pth", "rb").read() == before  # never truncated
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "random"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog, damage):
    states = _checkpointer_with_history(tmp_path, (4, 9, 14))
    last = tmp_path / "model_0000014.pth"
    data = last.read_bytes()
    if damage == "missing":
        last.unlink()
    else:
        last.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                          "random": np.random.default_rng(0).bytes(999)}[damage])
    model = _randomized(_Net(), 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = SafeDetectionCheckpointer(model, str(tmp_path), optimizer=opt)
    with caplog.at_level("WARNING", logger="fpn_plugin"):
        extra = ck.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, states[9][k], rtol=0, atol=0)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "model_0000014.pth" in warned and "model_0000009.pth" in warned


def test_resume_with_a_garbled_last_checkpoint_file(tmp_path):
    _checkpointer_with_history(tmp_path, (4,))
    (tmp_path / "last_checkpoint").write_bytes(b"\x00\x01garbage")
    model = _Net()
    extra = SafeDetectionCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 4


def test_resume_without_any_intact_checkpoint_is_an_error_listing_them(tmp_path):
    _checkpointer_with_history(tmp_path, (4, 9))
    for name in ("model_0000004.pth", "model_0000009.pth"):
        (tmp_path / name).write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        SafeDetectionCheckpointer(_Net(), str(tmp_path)).resume_or_load("", resume=True)
    assert "model_0000004.pth" in str(info.value) and "model_0000009.pth" in str(info.value)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_code_in_a_resumed_checkpoint_never_runs(tmp_path, suffix):
    """A code-running file named by last_checkpoint is refused (and named), never executed;
    the intact checkpoint before it is used."""
    _checkpointer_with_history(tmp_path, (4,))
    marker = tmp_path / "code_ran"
    evil = tmp_path / ("model_0000009" + suffix)
    payload = {"model": {"fc.weight": _RunsCode(marker)}, "iteration": 9}
    if suffix == ".pkl":
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, str(evil))
    (tmp_path / "last_checkpoint").write_text(evil.name)
    extra = SafeDetectionCheckpointer(_Net(), str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 4
    assert not marker.exists()


def test_proposal_file_is_read_safely(tmp_path):
    """Precomputed proposals (DATASETS.PROPOSAL_FILES_*) load without pickle's code path:
    arrays and BoxMode come back, a code-running file is refused and never runs."""
    from detectron2.structures import BoxMode

    from fpn_plugin.data.proposals import load_proposal_file, load_proposals_into_records

    good = tmp_path / "proposals.pkl"
    with open(good, "wb") as f:
        pickle.dump({"ids": [7], "boxes": [np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32)],
                     "objectness_logits": [np.array([0.1, 0.9], np.float32)],
                     "bbox_mode": BoxMode.XYXY_ABS}, f)
    records = load_proposals_into_records([{"image_id": 7, "file_name": "a.jpg"}], str(good))
    assert records[0]["proposal_objectness_logits"].tolist() == pytest.approx([0.9, 0.1])
    assert records[0]["proposal_bbox_mode"] == BoxMode.XYXY_ABS
    with pytest.raises(ValueError, match="no proposals for image_id 8"):
        load_proposals_into_records([{"image_id": 8, "file_name": "b.jpg"}], str(good))

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil_proposals.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"ids": [7], "boxes": _RunsCode(marker), "objectness_logits": []}, f)
    with pytest.raises(ValueError, match="was not loaded") as info:
        load_proposal_file(str(evil))
    assert str(evil) in str(info.value)
    assert not marker.exists()
