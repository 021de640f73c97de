"""
The CPU-aware choice of the fast paths (issue 27): ``"auto"`` picks bf16 only where the CPU runs
it natively (AVX512-BF16 / AMX), exact fp32 (inference: in channels-last) elsewhere, fp16 on
CUDA; an explicit bf16 on a CPU that emulates it warns once, naming the setting. The CPU flags
are faked both ways, so the same assertions hold on any machine.
"""
import logging

import pytest
import torch
from detectron2.modeling import build_model
from model_testutils import tiny_mask_rcnn_cfg

import fpn_plugin.utils.precision as fpn_precision
from fpn_plugin.engine.precision import check_training_precision, enable_fast_training
from fpn_plugin.inference import enable_fast_inference
from fpn_plugin.utils.precision import (
    auto_inference_path,
    auto_training_precision,
    cpu_flags,
    cpu_has_native_bf16,
    warn_if_emulated_bf16,
)

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f"})


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(native): this process sees a CPU with or without native bf16; warnings re-armed."""
    monkeypatch.setattr(fpn_precision, "_WARNED_EMULATED", set())

    def fake(native: bool):
        monkeypatch.setattr(fpn_precision, "cpu_has_native_bf16", lambda flags=None: native)
    return fake


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert not cpu_has_native_bf16(AVX2_ONLY)
    assert cpu_has_native_bf16(AVX2_ONLY | {"avx512_bf16"})
    assert cpu_has_native_bf16(AVX2_ONLY | {"amx_bf16"})
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbogomips\t: 1\n")
    assert cpu_flags(str(cpuinfo)) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("native, inference, training", [
    (True, ("bf16", False), "bf16"),
    (False, ("fp32", True), "fp32"),
])
def test_auto_picks_by_the_cpu(native, inference, training):
    assert auto_inference_path("cpu", native_bf16=native) == inference
    assert auto_training_precision("cpu", native_bf16=native) == training
    # CUDA does not depend on the CPU: fp16 (training with a gradient scaler), as before.
    assert auto_inference_path("cuda", native_bf16=native) == ("fp16", False)
    assert auto_training_precision("cuda", native_bf16=native) == "fp16"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_training_auto_resolves_by_the_cpu(fake_cpu, native, expected):
    fake_cpu(native)
    assert check_training_precision("auto", "cpu", False) == expected


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = tiny_mask_rcnn_cfg(num_classes=3, components="plugin")
    return cfg


@pytest.mark.parametrize("native, expected", [(True, ("bf16", False)), (False, ("fp32", True))])
def test_inference_auto_sets_up_the_model_for_the_cpu(fake_cpu, tiny_cfg, native, expected):
    fake_cpu(native)
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    enable_fast_inference(model, "auto")
    assert model._fpn_plugin_fast_inference == expected
    if expected[1]:  # channels-last: the backbone's convs hold NHWC weights
        conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # An explicit CHANNELS_LAST True is kept whatever "auto" picks.
    enable_fast_inference(model, "auto", channels_last=True)
    assert model._fpn_plugin_fast_inference == (expected[0], True)


def test_explicit_bf16_on_an_emulating_cpu_warns_once_naming_the_setting(fake_cpu, tiny_cfg, caplog):
    fake_cpu(False)
    model = build_model(tiny_cfg).eval()
    with caplog.at_level(logging.WARNING, logger="fpn_plugin.utils.precision"):
        enable_fast_inference(model, "bf16")
        enable_fast_inference(model, "bf16")
    warnings = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "MODEL.FAST_INFERENCE.PRECISION 'bf16'" in warnings[0]
    assert fpn_precision.EMULATED_BF16_SLOWDOWN in warnings[0]
    assert model._fpn_plugin_fast_inference == ("bf16", False)  # warned, not overridden

    caplog.clear()
    train_model = build_model(tiny_cfg).train()
    with caplog.at_level(logging.WARNING, logger="fpn_plugin.utils.precision"):
        enable_fast_training(train_model, "bf16")
    assert any("training precision" in r.getMessage() and "emulated" in r.getMessage()
               for r in caplog.records)


def test_no_warning_where_bf16_is_native_or_not_asked(fake_cpu):
    fake_cpu(True)
    assert not warn_if_emulated_bf16("bf16", "cpu", "KEY")
    fake_cpu(False)
    assert not warn_if_emulated_bf16("fp32", "cpu", "KEY")
    assert not warn_if_emulated_bf16("bf16", "cuda", "KEY")
    assert warn_if_emulated_bf16("bf16", "cpu", "KEY")


def test_unknown_values_name_the_key(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    with pytest.raises(ValueError, match="MODEL.FAST_INFERENCE.PRECISION: unknown value 'bf17'"):
        enable_fast_inference(model, "bf17")
    with pytest.raises(ValueError, match="MODEL.FAST_INFERENCE.CHANNELS_LAST must be True or False"):
        enable_fast_inference(model, "auto", channels_last="yes")
