#!/usr/bin/env bash
# One GPU host: one process drives every visible GPU (no jax.distributed).
# Hyperparameters live in the config; this script sets XLA's GPU flags and starts
# `python -m dwt_jax.main`. Run `launch/gpu_local.sh --help` for the options.
set -euo pipefail

readonly PROG="launch/gpu_local.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_local.sh --config CONFIG --workdir DIR [--dry-run] [-- MAIN_FLAGS...]

Runs `python -m dwt_jax.main --config=CONFIG --workdir=DIR --distributed=off` on this
host's GPUs (all of those CUDA_VISIBLE_DEVICES lets JAX see), from the current
directory (run it from the repository root, with the package and jax[cuda12] installed).

Options:
  --config CONFIG   config path with ':variant', e.g. configs/scale/bert_base.py:8xh100
  --workdir DIR     run directory (checkpoints, metrics, TensorBoard)
  --dry-run         print the command (one line, with its environment) and run nothing
  -h, --help        this help

Everything after `--` is passed on to `python -m dwt_jax.main`.

Environment:
  PYTHON                          the interpreter (default: python)
  XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX preallocates (default: 0.90)
  XLA_FLAGS                       kept; the GPU flags below are added after it
EOF
}

readonly HELP_CMD="${PROG}"
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
DRY_RUN=0
MAIN_FLAGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config | --workdir)
      [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
      if [[ $1 == --config ]]; then CONFIG=$2; else WORKDIR=$2; fi
      shift 2
      ;;
    --config=*) CONFIG=${1#*=} && shift ;;
    --workdir=*) WORKDIR=${1#*=} && shift ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    --)
      shift
      MAIN_FLAGS=("$@")
      break
      ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required (e.g. configs/scale/bert_base.py:8xh100)"
[[ -n $WORKDIR ]] || die "--workdir is required (e.g. runs/bert_base)"

if ((DRY_RUN == 0)); then
  command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found: no NVIDIA driver on this host (or use --dry-run)"
  gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader) ||
    die "nvidia-smi failed: the NVIDIA driver cannot see a GPU"
  [[ -n $gpus ]] || die "nvidia-smi lists no GPU"
  echo "${PROG}: $(wc -l <<<"$gpus") GPU(s): $(sort <<<"$gpus" | uniq -c | xargs)" >&2
fi

# The latency-hiding scheduler overlaps collectives (gradient all-reduce, FSDP
# all-gathers) with compute. JAX preallocates this fraction of each GPU's memory.
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
command=(env "XLA_FLAGS=${xla_flags}"
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
  "${PYTHON:-python}" -m dwt_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=off
  ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})

if ((DRY_RUN)); then
  quote_all "${command[@]}"
  echo
  exit 0
fi
echo "+ $(quote_all "${command[@]}")" >&2
exec "${command[@]}"
