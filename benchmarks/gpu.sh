#!/usr/bin/env bash
# The train-step benchmark on one GPU: the BERT-base, BERT-large and Llama-1B DWT steps
# of configs/scale/ in bfloat16 (benchmarks/step.py), with MFU and GPU memory.
# Run `benchmarks/gpu.sh --help` for the options.
set -euo pipefail

readonly PROG="benchmarks/gpu.sh"

usage() {
  cat <<'EOF'
Usage: benchmarks/gpu.sh [--steps N] [--out DIR] [--only NAMES] [--cpu-dry-run]

Times the train steps of each model pair below on GPU 0 with benchmarks/step.py:
our jitted DWT step (student forward + backward, teacher forward, AdamW) and the
student-only step, bfloat16 compute, float32 parameters, one device, no PyTorch
references. Prints per run tokens/s, MFU (against the bf16 matmul throughput
measured in the same run, and against the GPU's nominal dense bf16 peak) and GPU
memory (device 0's peak bytes in use after the DWT step's warm-up, from
jax.devices()[0].memory_stats()), then a summary table. JSON and markdown per run
go to DIR (summary.md too).

  bert_base   configs/scale/bert_base.py:8xh100   batch 128 × 128 (its per-GPU batch)
  bert_large  configs/scale/bert_large.py:8xh100  batch 128 × 128 (its per-GPU batch)
  llama_1b    configs/scale/llama_1b.py:8xh100    batch 8 × 2048 (its micro-batch)

Options:
  --steps N       timed steps per run (median; default 10)
  --out DIR       where the results go (default benchmarks/results/gpu)
  --only NAMES    comma-separated subset of the runs above, e.g. bert_base,llama_1b
  --cpu-dry-run   the same runs on the CPU with the models shrunk (step.py --tiny),
                  batch 2, 2 steps, into DIR/dry_run: checks all but the GPU
  -h, --help      this help

Run it from anywhere; it uses the jax already installed (nothing is installed) and
puts the repository root on PYTHONPATH. It stops at once if JAX sees no GPU or a
module the benchmark needs is missing. Environment:
  PYTHON                          the interpreter (default: python3)
  XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX preallocates (default: 0.90)
  BERT_BASE_BATCH, BERT_LARGE_BATCH, LLAMA_1B_BATCH   the batches above
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  echo "Run '${PROG} --help' for details." >&2
  exit 2
}

STEPS=10
OUT=benchmarks/results/gpu
ONLY=""
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --steps | --out | --only)
      [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --steps) STEPS=$2 ;;
        --out) OUT=$2 ;;
        *) ONLY=$2 ;;
      esac
      shift 2
      ;;
    --steps=*) STEPS=${1#*=} && shift ;;
    --out=*) OUT=${1#*=} && shift ;;
    --only=*) ONLY=${1#*=} && shift ;;
    --cpu-dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer (got '$STEPS')"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

# name, config, batch: one run each.
RUNS=(
  "bert_base configs/scale/bert_base.py:8xh100 ${BERT_BASE_BATCH:-128}"
  "bert_large configs/scale/bert_large.py:8xh100 ${BERT_LARGE_BATCH:-128}"
  "llama_1b configs/scale/llama_1b.py:8xh100 ${LLAMA_1B_BATCH:-8}"
)
EXTRA=()
PLATFORM=gpu
if ((DRY_RUN)); then
  PLATFORM=cpu
  export JAX_PLATFORMS=cpu
  OUT="${OUT}/dry_run"
  STEPS=2
  EXTRA=(--tiny)
fi

NAMES=()
for run in "${RUNS[@]}"; do
  read -r name _ _ <<<"$run"
  if [[ -z $ONLY || ",${ONLY}," == *",${name},"* ]]; then
    NAMES+=("$name")
  fi
done
((${#NAMES[@]})) || die "--only '${ONLY}' names none of: bert_base, bert_large, llama_1b"

# Fail fast: the modules the benchmark imports, and a GPU that JAX can see.
"$PYTHON" - "$PLATFORM" <<'PY' || die "the check above failed; nothing was run"
import sys

try:
    import jax

    import dwt_jax.plan  # noqa: F401 (everything benchmarks/step.py needs)
except ImportError as e:
    sys.exit(
        f"cannot import {e.name!r} ({e}): this Python lacks a module of dwt_jax's "
        "dependencies (pyproject.toml); install them or pick another PYTHON"
    )
platform = sys.argv[1]
if jax.default_backend() != platform:
    sys.exit(
        f"JAX sees no {platform.upper()}: its backend is {jax.default_backend()!r}, devices "
        f"{jax.devices()}; check nvidia-smi, CUDA_VISIBLE_DEVICES and jax's CUDA plugin"
    )
device = jax.devices()[0]
print(f"jax {jax.__version__}: {jax.device_count()} device(s), the benchmark uses {device} "
      f"({device.device_kind})", file=sys.stderr)
PY

mkdir -p "$OUT"
for run in "${RUNS[@]}"; do
  read -r name config batch <<<"$run"
  [[ " ${NAMES[*]} " == *" ${name} "* ]] || continue
  ((DRY_RUN == 0)) || batch=2
  echo "${PROG}: ${name}: ${config}, batch ${batch}" >&2
  "$PYTHON" benchmarks/step.py --config "$config" --batch "$batch" --dtype bfloat16 \
    --platform "$PLATFORM" --torch off --steps "$STEPS" ${EXTRA[@]+"${EXTRA[@]}"} \
    --json "${OUT}/${name}.json" --markdown "${OUT}/${name}.md"
  echo
done

"$PYTHON" - "$OUT" "${NAMES[@]}" <<'PY' | tee "${OUT}/summary.md"
import json
import os
import sys

out, names = sys.argv[1], sys.argv[2:]
print("| run | params (student / teacher) | batch × length | DWT s/step | tokens/s | "
      "MFU (measured matmul) | MFU (nominal) | GPU peak GiB | host peak RSS GiB |")
print("|---|---|---|---|---|---|---|---|---|")
for name in names:
    with open(os.path.join(out, f"{name}.json")) as f:
        r = json.load(f)
    dwt, memory, s = r["dwt"], r["dwt_memory"], r["settings"]
    params = f"{r['params']['student'] / 1e6:,.1f}M / {r['params']['teacher'][0] / 1e6:,.1f}M"
    nominal = f"{100 * dwt['mfu_nominal']:.1f}%" if "mfu_nominal" in dwt else "–"
    device = memory.get("device_peak_bytes")
    device = f"{device / 2**30:.2f}" if device is not None else "–"
    print(f"| {name} | {params} | {s['batch']} × {s['seq_len']} | {dwt['step_s']:.4f} | "
          f"{dwt['tokens_per_s']:,.0f} | {100 * dwt['mfu']:.1f}% | {nominal} | {device} | "
          f"{memory['peak_rss_bytes'] / 2**30:.2f} |")
print(f"\n{r['machine']}; jax {r['jax']}; bf16 matmul {r['matmul_flops_per_s'] / 1e12:.0f} "
      "TFLOP/s measured.")
PY
