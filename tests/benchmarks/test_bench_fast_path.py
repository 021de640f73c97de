"""benchmarks/bench_fast_path.py measures "auto" by default and names it with what it picks on
the machine at hand, bf16 only where the CPU computes bf16 natively (flags faked both ways)."""
import argparse
import importlib.util
import os

import pytest

from fpn_plugin.utils import precision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_fast_path_under_test", os.path.join(ROOT, "benchmarks", "bench_fast_path.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_is_a_default_variant(bench):
    args = bench.parse_args([])
    assert ("auto", False) in args.variants


@pytest.mark.parametrize("flags,picked", [("fpu sse avx2 avx512f avx512_bf16", "bf16"),
                                          ("fpu sse avx2 fma", "fp32 + channels_last")])
def test_auto_is_named_with_its_choice(bench, monkeypatch, flags, picked):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags.split()))
    assert bench.variant_name("auto", False) == f"auto (= {picked})"
    assert bench.variant_name("bf16", True) == "bf16 + channels_last"


def test_fp32_alone_and_unknown_names_are_refused(bench):
    for text in ("fp32", "int8", "auto+nhwc"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_variant(text)
    assert bench.parse_variant("auto+cl") == ("auto", True)
