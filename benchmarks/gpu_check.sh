#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, within about 8 minutes and downloading nothing,
#   1. the device tests (pytest -m cuda, tests/test_cuda.py): fp32 forward/backward vs CPU, bf16 and fp16 autocast
#      steps with loss scaling, the SDPA kernel actually selected (flash or memory-efficient, asserted), train.compile,
#      activation checkpointing, the EMA on the device, and 1-GPU trainer runs (deepspeed --num_gpus 1) under
#      ZeRO-1 (bf16), ZeRO-2 (fp16), ZeRO-3 (bf16) and ZeRO-3 with parameter offload (fp32/TF32) each ending in a
#      sample grid;
#   2. DiT-XL/2 bf16 train steps at 256 and 512 px, ours vs diffusers' DiTTransformer2DModel, eager and compiled,
#      at the largest batch that fits: samples/s, TFLOP/s, MFU (benchmarks/bench_gpu_step.py);
#   3. the real Trainer (DiT-XL/2 256 px bf16 ZeRO-2, batch 256, compiled and eager) on latent shards: samples/s
#      against step 2's bare step, and CUDA's own count of host syncs per optimizer step (bench_gpu_trainer.py);
# and writes everything (device, driver, versions, each test's outcome, every figure) to
# benchmarks/results/gpu_<device>_<date>.json (steps 1-2) and gpu_<device>_<date>_trainer.json (step 3).
# docs/performance.md's GPU tables are filled from those files.
#
#   bash benchmarks/gpu_check.sh                      # on a GPU machine; commit the JSON it writes
#   GPU_CHECK_TEST_TIMEOUT=330 bash benchmarks/gpu_check.sh   # the limits in seconds (tests 270, timing 240 with
#                                                     # new variants started within GPU_CHECK_BENCH_BUDGET=200,
#                                                     # trainer 330: GPU_CHECK_TRAINER_TIMEOUT)
#   bash benchmarks/gpu_check.sh --dry-run [--out F]  # the same steps on CPU with tiny shapes (the device tests
#                                                     # skip with their reason), under a minute; tests/test_gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

# nothing is fetched: no model hub, no dataset hub, no W&B (the models are built from configs; the demo data come
# from scikit-image's wheel)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFUSERS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

if [ "$dry" = 1 ]; then
  out="${out:-${TMPDIR:-/tmp}/gpu_check_dryrun.json}"
  bench_args=(--dry-run --budget-seconds 40)
  trainer_args=(--dry-run)
  test_timeout=60 bench_timeout=60 trainer_timeout=90
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to torch; run with --dry-run to walk the script on CPU" >&2
    exit 2
  fi
  name="$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_"))')"
  out="${out:-benchmarks/results/gpu_${name}_$(date +%Y-%m-%d).json}"
  bench_args=(--budget-seconds "${GPU_CHECK_BENCH_BUDGET:-200}")
  trainer_args=(--variant-timeout 150)
  test_timeout="${GPU_CHECK_TEST_TIMEOUT:-270}" bench_timeout="${GPU_CHECK_BENCH_TIMEOUT:-240}"
  trainer_timeout="${GPU_CHECK_TRAINER_TIMEOUT:-330}"
fi

echo "== 1/3 device tests (pytest -m cuda)"
tests_rc=0
timeout "$test_timeout" "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py -p no:cacheprovider \
  --junitxml "$work/device_tests.xml" || tests_rc=$?
if [ "$dry" = 1 ] && [ "$tests_rc" = 5 ]; then tests_rc=0; fi   # 5: every test deselected/skipped is fine on CPU

echo "== 2/3 DiT train-step timing"
bench_rc=0
timeout "$bench_timeout" "$PY" benchmarks/bench_gpu_step.py "${bench_args[@]}" --tests-junit "$work/device_tests.xml" \
  --out "$out" || bench_rc=$?

echo "== 3/3 the Trainer on the GPU vs the bare step"
trainer_out="${out%.json}_trainer.json"
trainer_rc=0
bare=()
if [ -f "$out" ]; then bare=(--bare "$out"); fi
timeout "$trainer_timeout" "$PY" benchmarks/bench_gpu_trainer.py "${trainer_args[@]}" "${bare[@]}" \
  --out "$trainer_out" || trainer_rc=$?

echo "== gpu_check: device tests exit $tests_rc, timing exit $bench_rc, trainer exit $trainer_rc," \
  "$(( $(date +%s) - start )) s; records: $out $trainer_out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$trainer_rc" = 0 ]
