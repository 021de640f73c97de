#!/usr/bin/env bash
# One short check of fpn_plugin on a CUDA machine that has torch preinstalled and no network
# (the GPU machines lent to this project: Python 3.12, torch 2.11, torchvision 0.26, numpy 2).
#
#   1. set-up from the wheels carried in the tree (`make gpu-wheels` prepares .whl/ on a
#      networked machine): host mode, so the machine's torch is kept and only what is missing
#      is installed, with pip --no-index;
#   2. the test suite (CUDA tests included; they skip without CUDA);
#   3. benchmarks/bench_models.py --device cuda, in fp32 and with --amp;
#      benchmarks/bench_train.py --device cuda: the fast training path in fp32, fp16 and bf16
#      (+ channels-last) against Detectron2's AMPTrainer, R50-FPN 800x1333 and the demo model;
#   4. a short demo training on the GPU (DEMO_ITERS iterations, then box/mask AP);
#   5. one summary (also written to $OUT/summary.txt when OUT is set, with the logs/results).
#
# Usage: tools/gpu_check.sh [--cpu]
#   --cpu  rehearsal on a machine without CUDA: the same steps in a copy of the tracked tree,
#          with a fresh set-up cache, the benchmark and demo shrunk to a few seconds on CPU.
#          Run it with a Python 3.12 that has torch preinstalled (see README, "GPU check") to
#          prove the wheel set is complete.
# Environment: PYTHON (default python3), WHEELS (default .whl), DEMO_ITERS (default 300),
#              PYTEST_ARGS (default "-n 8" on CUDA), OUT (where to copy results, optional).
set -uo pipefail

MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="$(cd "$REPO" && realpath -m "${WHEELS:-.whl}")"
START=$(date +%s)
declare -a SUMMARY=()

note() { echo "[gpu_check] $*"; }
record() { SUMMARY+=("$1"); note "$1"; }
elapsed() { echo $(( $(date +%s) - $1 )); }

if [ ! -d "$WHEELS" ]; then
  echo "no wheels folder $WHEELS: run \`make gpu-wheels\` on a networked machine first" >&2
  exit 2
fi

if [ "$MODE" = cpu ]; then
  # Work in a copy, with its own cache: this checkout's .venv and cache stay as they are.
  WORK="$(mktemp -d /tmp/fpn-gpu-check-XXXXXX)"
  (cd "$REPO" && git ls-files -z | xargs -0 cp --parents -t "$WORK")
  export FPN_PLUGIN_CACHE="$WORK/.cache"
  DEVICE=cpu
  DEMO_ITERS="${DEMO_ITERS:-4}"
  PYTEST_ARGS="${PYTEST_ARGS:-}"
  DEMO_DATA=(DATASETS.SHAPES.NUM_TRAIN 16 DATASETS.SHAPES.NUM_VAL 8 DATASETS.SHAPES.ROOT "$WORK/datasets/gpu_check_shapes")
  BENCH_ARGS=(--size 128 128 --repeats 3 --warmup 1 --no-memory)
  TRAIN_BENCH_ARGS=(--models demo --batch 1 --variants bf16+cl --repeats 1 --warmup 1 --no-memory)
else
  WORK="$REPO"
  DEVICE=cuda
  DEMO_ITERS="${DEMO_ITERS:-300}"
  PYTEST_ARGS="${PYTEST_ARGS:--n 8}"
  DEMO_DATA=()
  BENCH_ARGS=()
  TRAIN_BENCH_ARGS=(--baseline d2-amp --variants fp32 fp16+cl bf16+cl --repeats 5 --warmup 2)
fi
cd "$WORK" || exit 2
LOG="$WORK/output/gpu_check/gpu_check.log"
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1
note "mode $MODE, python $PYTHON, wheels $WHEELS, work tree $WORK"

# 1. Set-up (offline).
t=$(date +%s)
if "$PYTHON" tools/env/setup_env.py --wheels "$WHEELS"; then
  record "set-up from $(ls "$WHEELS" | wc -l) carried wheels: ok in $(elapsed "$t") s"
else
  record "set-up: FAILED (see $LOG)"
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
PY=.venv/bin/python
record "$($PY -c 'import sys, torch, torchvision, numpy, PIL, detectron2
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"numpy {numpy.__version__}, Pillow {PIL.__version__}, detectron2 {detectron2.__version__}, {cuda}")')"
if [ "$MODE" = cuda ] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  record "torch sees no CUDA device: run with --cpu on machines without one"
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi

# 2. Tests: the CUDA tests on their own (their count in the summary), then the rest.
# The tests marked `network` (tests/test_setup_env.py: set-ups from the registry) skip by
# default; the rest run in a shuffled order (seed in pytest.log's header), as `make test` does.
# The CUDA tests compare detection by detection, CUDA training with CPU training and AMP with
# fp32 (tests/test_cuda.py; their tolerances are explained there).
summary_line() { grep -E '^(=+ )?[0-9]+ (passed|failed|skipped)' "$1" | tail -n 1 | tr -d '=' | xargs; }
t=$(date +%s)
timeout 300 $PY -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider > output/gpu_check/pytest_cuda.log 2>&1
record "CUDA tests (rc $?, $(elapsed "$t") s): $(summary_line output/gpu_check/pytest_cuda.log)"
grep -E "(PASSED|FAILED|SKIPPED|ERROR)" output/gpu_check/pytest_cuda.log | tail -n 12
t=$(date +%s)
# shellcheck disable=SC2086
timeout 300 $PY -m pytest tests -q -rs -p no:cacheprovider --random-order-bucket=module \
  --ignore=tests/test_cuda.py $PYTEST_ARGS > output/gpu_check/pytest.log 2>&1
rc=$?
tail -n 30 output/gpu_check/pytest.log
record "other tests (rc $rc, $(elapsed "$t") s): $(summary_line output/gpu_check/pytest.log)"

# 3. Component benchmark, fp32 and AMP.
for amp in "" "--amp"; do
  name="models_${DEVICE}${amp:+_amp}_gpu_check"
  t=$(date +%s)
  # shellcheck disable=SC2086
  if timeout 240 $PY benchmarks/bench_models.py --device "$DEVICE" $amp --name "$name" "${BENCH_ARGS[@]}" \
      > "output/gpu_check/$name.log" 2>&1; then
    record "bench ${amp:-fp32} ($(elapsed "$t") s): $($PY - "$name" <<'EOF'
import json, sys
rows = json.load(open(f"output/benchmarks/{sys.argv[1]}.json"))["rows"]
print(", ".join(f"{r['name']} {r['result']['ratio']:.3f}" for r in rows if r["name"].endswith("time")))
EOF
)"
  else
    record "bench ${amp:-fp32}: FAILED (output/gpu_check/$name.log)"
    tail -n 20 "output/gpu_check/$name.log"
  fi
done
# Training iterations: the fast training path (A) against Detectron2's trainer (B).
name="train_${DEVICE}_gpu_check"
t=$(date +%s)
if timeout 240 $PY benchmarks/bench_train.py --device "$DEVICE" --name "$name" "${TRAIN_BENCH_ARGS[@]}" \
    > "output/gpu_check/$name.log" 2>&1; then
  record "bench_train ($(elapsed "$t") s): $($PY - "$name" <<'EOF'
import json, sys
rows = json.load(open(f"output/benchmarks/{sys.argv[1]}.json"))["rows"]
print("; ".join(f"{r['name'].rsplit(',', 1)[0]} {1 / r['result']['ratio']:.2f}x faster"
                for r in rows if r["unit"] == "s"))
EOF
)"
else
  record "bench_train: FAILED (output/gpu_check/$name.log)"
  tail -n 20 "output/gpu_check/$name.log"
fi

# 4. Demo training on the device.
t=$(date +%s)
demo_out="$WORK/output/gpu_check/demo"
steps="($(( DEMO_ITERS * 3 / 4 )),)"  # the demo recipe's first LR step, scaled
warmup=$(( DEMO_ITERS / 10 > 0 ? DEMO_ITERS / 10 : 1 ))
if timeout 300 $PY projects/fpn_mask_rcnn/demo.py --fresh --output-dir "$demo_out" \
    MODEL.DEVICE "$DEVICE" SOLVER.MAX_ITER "$DEMO_ITERS" SOLVER.STEPS "$steps" \
    SOLVER.WARMUP_ITERS "$warmup" SOLVER.CHECKPOINT_PERIOD "$DEMO_ITERS" \
    TEST.EVAL_PERIOD 0 DATALOADER.NUM_WORKERS 4 "${DEMO_DATA[@]}" > output/gpu_check/demo.log 2>&1; then
  record "demo, $DEMO_ITERS iterations on $DEVICE ($(elapsed "$t") s): $($PY - "$demo_out" <<'EOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/demo_summary.json"))
print(f"box AP {s['box_AP']:.2f}, mask AP {s['mask_AP']:.2f}, total {s['total_seconds']} s")
EOF
)"
else
  record "demo: FAILED (output/gpu_check/demo.log)"
  tail -n 30 output/gpu_check/demo.log
fi

echo
echo "================ fpn_plugin GPU check ($MODE mode, $(elapsed "$START") s) ================"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${OUT:-}" ]; then
  printf '%s\n' "${SUMMARY[@]}" > "$OUT/summary.txt"
  cp "$LOG" output/gpu_check/pytest.log output/gpu_check/pytest_cuda.log "$OUT/" 2>/dev/null
  cp output/benchmarks/models_"${DEVICE}"*_gpu_check.md output/benchmarks/train_"${DEVICE}"_gpu_check.md \
    "$OUT/" 2>/dev/null
  cp "$demo_out/demo_summary.json" "$OUT/" 2>/dev/null
fi
[ "$MODE" = cpu ] && note "work tree kept for inspection: $WORK (delete it when done)"
exit 0
