#!/usr/bin/env python
"""
The fast inference paths on the two kinds of CPU, in one run on one machine (issue 27).

Kinds:
  native   this CPU as it is (on a CPU with AVX512-BF16/AMX, bf16 runs natively);
  avx2     the same CPU with oneDNN, MKL and ATen limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
           MKL_ENABLE_INSTRUCTIONS=AVX2, ATEN_CPU_CAPABILITY=avx2): the kernels an AVX2-only
           CPU (most laptops, many cloud VMs) runs, bf16 emulated. Not a real AVX2 machine:
           absolute times differ there, the ratios are what this measures.
For each kind, in a child process: the demo's Mask R-CNN (R18 + the plugin's neck, per-level
RPN and mask head; randomly initialized, seed 0: speed, not accuracy) on one 256x256 image,
each variant against fp32 NCHW in ABBA order (harness.compare): fp32 + channels-last, bf16,
and "auto" as it resolves on that kind of CPU (fpn_plugin.utils.precision.auto_inference_path).
Medians, interquartile spread and every raw sample are written.

  .venv/bin/python benchmarks/bench_cpu_kinds.py [--write-results]
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = harness.ROOT
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2"}
KINDS = {"native": {}, "avx2": AVX2_ENV}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9, help="timed calls of each side (ABBA)")
    p.add_argument("--slow-repeats", type=int, default=3,
                   help="repeats where a variant is emulated bf16 (tens of seconds a call)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=sorted(KINDS), help=argparse.SUPPRESS)
    harness.add_output_arguments(p)
    return p.parse_args(argv)


def _measure(kind: str, args) -> dict:
    """In the child: every variant against fp32 on this process's kernels."""
    import copy

    import torch
    from detectron2.modeling import build_model

    import fpn_plugin  # noqa: F401  (registers the components)
    from fpn_plugin.config import load_config
    from fpn_plugin.inference import enable_fast_inference
    from fpn_plugin.utils.precision import auto_inference_path, cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(DEMO_CONFIG, ["MODEL.DEVICE", "cpu"])
    reference = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, args.image_size, args.image_size), dtype=torch.uint8)
    inputs = [{"image": image, "height": args.image_size, "width": args.image_size}]
    native = kind == "native" and cpu_has_native_bf16()
    variants = {"fp32 + channels-last": ("fp32", True), "bf16": ("bf16", False),
                "auto": auto_inference_path("cpu", native_bf16=native)}
    results = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
    for label, (precision, channels_last) in variants.items():
        model = enable_fast_inference(copy.deepcopy(reference), precision, channels_last)
        slow = precision == "bf16" and not native
        repeats = args.slow_repeats if slow else args.repeats
        with torch.no_grad():
            out = harness.compare(lambda: model(inputs), lambda: reference(inputs),
                                  warmup=1 if slow else 3, repeats=repeats)
        results["rows"].append({
            "variant": label, "resolved": [precision, channels_last],
            "a": vars(out["a"]), "b": vars(out["b"]), "ratio": out["ratio"],
            "samples_a": out.get("samples_a"), "samples_b": out.get("samples_b")})
        print(f"[bench] {kind}: {label} ({precision}, channels_last={channels_last}) "
              f"{out['ratio']:.3f}x fp32", file=sys.stderr, flush=True)
    return results


def _run_child(kind: str, args) -> dict:
    env = {**os.environ, **KINDS[kind]}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind,
           "--image-size", str(args.image_size), "--repeats", str(args.repeats),
           "--slow-repeats", str(args.slow_repeats), "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child, args)))
        return
    from fpn_plugin.utils.precision import cpu_flags, cpu_has_native_bf16

    rows, children = [], {}
    for kind in KINDS:
        children[kind] = child = _run_child(kind, args)
        for row in child["rows"]:
            rows.append({"name": f"{kind} ({child['cpu_capability']}): {row['variant']} "
                                      f"= {row['resolved'][0]}"
                                      f"{' + channels-last' if row['resolved'][1] else ''}",
                         "unit": "s", "result": {"a": row["a"], "b": row["b"],
                                                 "ratio": row["ratio"]}})
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    notes = (
        f"One {args.image_size}x{args.image_size} image, the demo's R18 model randomly "
        f"initialized, {args.threads} threads; A = the variant, B = fp32 NCHW in the same "
        "process. `avx2`: this CPU with oneDNN/MKL/ATen limited to AVX2 (bf16 emulated), "
        f"not a real AVX2 machine. This CPU has native bf16: {cpu_has_native_bf16()}; flags: "
        f"{' '.join(flags)}.")
    harness.save("bench_cpu_kinds", rows, "python benchmarks/bench_cpu_kinds.py --write-results",
                 extra={"cpu_flags": flags, "native_bf16": cpu_has_native_bf16(),
                        "kinds": {k: {"env": KINDS[k], **v} for k, v in children.items()}},
                 labels=("variant", "fp32"), notes=notes, write_results=args.write_results)


if __name__ == "__main__":
    main()
