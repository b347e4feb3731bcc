#!/usr/bin/env bash
# Cloud TPU pod slices: create a TPU VM slice, install this checkout on every worker,
# run dwt_jax on all of them (one JAX process per host), delete the slice.
# Hyperparameters live in the config; this script only moves code and starts processes.
# Run `launch/tpu_pod.sh --help` for the options; --dry-run prints every command.
set -euo pipefail

readonly PROG="launch/tpu_pod.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- MAIN_FLAGS...]

Commands:
  create    create the TPU VM slice (needs --accelerator)
  install   copy this checkout (or git clone --repo) to every worker; install it and
            jax[tpu] into a Python 3.11 virtual environment there (uv)
  run       run `python -m dwt_jax.main --distributed=on` on every worker at once
            (needs --config and --workdir)
  delete    delete the slice
  all       create, install and run (then delete, with --teardown)

Options:
  --name NAME          TPU VM name (required)
  --zone ZONE          zone, e.g. us-central2-b (v4), us-west4-a (v5e) (required)
  --accelerator TYPE   accelerator type, e.g. v4-32, v5litepod-64 (v5e-64 is accepted)
  --version RUNTIME    TPU software version (default: chosen from the accelerator)
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --spot               create a spot slice (cheaper; can be preempted: runs resume)
  --config CONFIG      config path inside the checkout, with ':variant', e.g.
                       configs/scale/bert_base.py:v4-32
  --workdir DIR        run directory shared by all workers, e.g. gs://BUCKET/dwt/run
                       (a gs:// workdir's bucket is mounted with gcsfuse on every
                       worker under /tmp/dwt_jax_gcs/BUCKET, and that path is used)
  --repo URL           install with `git clone URL` on the workers instead of copying
                       this checkout; --ref REF checks out a branch, tag or commit
  --ref REF            see --repo
  --remote-dir DIR     checkout directory on the workers, relative to $HOME (dwt_jax)
  --python VERSION     Python of the workers' virtual environment (3.11)
  --detach             run in the background on the workers (log: REMOTE_DIR/run.log)
  --teardown           with 'all': delete the slice when the run ends (also when it
                       fails; the workdir keeps the checkpoints and metrics)
  --dry-run            print the commands, one per line, and run none of them
  -h, --help           this help

Everything after `--` is passed on to `python -m dwt_jax.main`, e.g.
  -- --config.data.tokenizer_path=hf/bert-base-uncased --config.train.num_steps=1000

Example:
  launch/tpu_pod.sh all --name dwt-base --zone us-central2-b --accelerator v4-32 \
      --config configs/scale/bert_base.py:v4-32 --workdir gs://BUCKET/dwt/bert_base
EOF
}

readonly HELP_CMD="${PROG}"
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

DRY_RUN=0
# Prints the command (stdout in a dry run, '+ command' on stderr otherwise) and runs it.
run_cmd() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# gcloud's accelerator type for TYPE (v5e-N is called v5litepod-N).
accelerator_type() {
  case $1 in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# The TPU software version for an accelerator type (empty: unknown, --version needed).
default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "" ;;
  esac
}

COMMAND=""
NAME=""
ZONE=""
ACCELERATOR=""
RUNTIME=""
PROJECT=""
SPOT=0
CONFIG=""
WORKDIR=""
REPO=""
REF=""
REMOTE_DIR="dwt_jax"
PYTHON_VERSION="3.11"
DETACH=0
TEARDOWN=0
MAIN_FLAGS=()

need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    create | install | run | delete | all)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND=$1
      shift
      ;;
    --name | --zone | --accelerator | --version | --project | --config | --workdir | \
      --repo | --ref | --remote-dir | --python)
      need_value "$@"
      case $1 in
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --accelerator) ACCELERATOR=$2 ;;
        --version) RUNTIME=$2 ;;
        --project) PROJECT=$2 ;;
        --config) CONFIG=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --repo) REPO=$2 ;;
        --ref) REF=$2 ;;
        --remote-dir) REMOTE_DIR=$2 ;;
        --python) PYTHON_VERSION=$2 ;;
      esac
      shift 2
      ;;
    --name=* | --zone=* | --accelerator=* | --version=* | --project=* | --config=* | \
      --workdir=* | --repo=* | --ref=* | --remote-dir=* | --python=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      ;;
    --spot) SPOT=1 && shift ;;
    --detach) DETACH=1 && shift ;;
    --teardown) TEARDOWN=1 && shift ;;
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

[[ -n $COMMAND ]] || die "a command is required: create, install, run, delete or all"
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
if [[ $COMMAND == create || $COMMAND == all ]]; then
  [[ -n $ACCELERATOR ]] || die "--accelerator is required for '$COMMAND' (e.g. v4-32)"
  ACCELERATOR=$(accelerator_type "$ACCELERATOR")
  RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
  [[ -n $RUNTIME ]] || die "no default TPU software version for '$ACCELERATOR'; give --version"
fi
if [[ $COMMAND == run || $COMMAND == all ]]; then
  [[ -n $CONFIG ]] ||
    die "--config is required for '$COMMAND' (e.g. configs/scale/bert_base.py:v4-32)"
  [[ -n $WORKDIR ]] || die "--workdir is required for '$COMMAND' (e.g. gs://BUCKET/dwt/run)"
fi
[[ -z $REF || -n $REPO ]] || die "--ref needs --repo"
((TEARDOWN == 0)) || [[ $COMMAND == all ]] || die "--teardown goes with 'all'"
((TEARDOWN == 0 || DETACH == 0)) || die "--teardown would delete the slice under a --detach run"
if ((DRY_RUN == 0)); then
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found; install the Google Cloud CLI (or use --dry-run)"
fi

# Options every `gcloud compute tpus tpu-vm` command takes.
COMMON=(--zone="$ZONE")
[[ -z $PROJECT ]] || COMMON+=(--project="$PROJECT")

do_create() {
  local args=(gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}"
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  ((SPOT == 0)) || args+=(--spot)
  run_cmd "${args[@]}"
}

# Runs a shell command (its arguments, joined by spaces) on every worker at once.
on_all_workers() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$*"
}

do_install() {
  local dir setup fetch tarball
  dir=$(quote "$REMOTE_DIR")
  # A Python 3.11 virtual environment whatever the image's python3 (uv fetches one),
  # with this package, JAX for TPUs and gcsfs (gs:// paths through TFDS/etils).
  setup="cd ${dir} && export PATH=\"\$HOME/.local/bin:\$PATH\""
  setup+=" && { command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  setup+=" && { [ -x .venv/bin/python ] || uv venv --python $(quote "$PYTHON_VERSION") .venv; }"
  setup+=" && uv pip install --python .venv/bin/python -e . 'jax[tpu]' gcsfs"
  # gcsfuse, which mounts a gs:// workdir's bucket (Google's apt repository).
  setup+=" && { command -v gcsfuse >/dev/null 2>&1 || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }; }"
  if [[ -n $REPO ]]; then
    fetch="{ [ -d ${dir}/.git ] || git clone $(quote "$REPO") ${dir}; }"
    if [[ -n $REF ]]; then
      fetch+=" && git -C ${dir} fetch origin $(quote "$REF")"
      fetch+=" && git -C ${dir} checkout --force FETCH_HEAD"
    else
      fetch+=" && git -C ${dir} pull --ff-only"
    fi
    on_all_workers "${fetch} && ${setup}"
  else
    # This checkout as it is (uncommitted changes included), without caches and runs.
    tarball="${TMPDIR:-/tmp}/dwt_jax-${NAME}.tar.gz"
    run_cmd tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=.venv \
      --exclude=./runs --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache --exclude=.ruff_cache .
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "${NAME}:dwt_jax.tar.gz" \
      "${COMMON[@]}" --worker=all
    on_all_workers "mkdir -p ${dir} && tar -xzf dwt_jax.tar.gz -C ${dir}" \
      "&& rm dwt_jax.tar.gz && ${setup}"
    ((DRY_RUN)) || rm -f "$tarball"
  fi
}

# Where a gs://BUCKET workdir's bucket is mounted on every worker (gcsfuse).
readonly GCS_MOUNT_ROOT="${DWT_JAX_GCS_MOUNT_ROOT:-/tmp/dwt_jax_gcs}"

do_run() {
  # --distributed=on: every worker joins one JAX runtime (the pod is detected by JAX).
  local main workdir="$WORKDIR" mount="" bucket rest
  if [[ $WORKDIR =~ ^gs://([^/]+)(/.*)?$ ]]; then
    # dwt_jax writes its workdir through the filesystem: mount the bucket on every
    # worker (directory renames, which checkpoint commits use, need --rename-dir-limit
    # on a flat bucket; a bucket with hierarchical namespace renames atomically).
    bucket=${BASH_REMATCH[1]}
    rest=${BASH_REMATCH[2]}
    workdir="${GCS_MOUNT_ROOT}/${bucket}${rest}"
    mount="mkdir -p $(quote "${GCS_MOUNT_ROOT}/${bucket}") && { mountpoint -q"
    mount+=" $(quote "${GCS_MOUNT_ROOT}/${bucket}") || gcsfuse --implicit-dirs"
    mount+=" --rename-dir-limit=1000000 $(quote "$bucket") $(quote "${GCS_MOUNT_ROOT}/${bucket}"); } && "
  fi
  main=$(quote_all .venv/bin/python -m dwt_jax.main --config="$CONFIG" --workdir="$workdir" \
    --distributed=on ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})
  if ((DETACH)); then
    main="nohup ${main} > run.log 2>&1 < /dev/null &"
  fi
  on_all_workers "${mount}cd $(quote "$REMOTE_DIR") && ${main}"
}

do_delete() {
  run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
}

case $COMMAND in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  delete) do_delete ;;
  all)
    do_create
    do_install
    if ((TEARDOWN)); then
      status=0
      do_run || status=$?
      do_delete
      exit "$status"
    fi
    do_run
    ;;
esac
