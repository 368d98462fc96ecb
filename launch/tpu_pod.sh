#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh create          # create the TPU VM slice
#   launch/tpu_pod.sh setup           # copy this checkout to every worker and pip install it
#   launch/tpu_pod.sh train [flags]   # run python -m jaxt2i.train on all workers at once
#   launch/tpu_pod.sh delete          # tear the slice down (stops billing)
#
# Change these (or export them) before use:
#   TPU_NAME, ZONE, ACCELERATOR (e.g. v4-256, v5p-128), RUNTIME (TPU VM software version),
#   PROJECT (gcloud project), WORKDIR (a gs:// bucket path: every host reads/writes it).
# jax.distributed.initialize() discovers the pod's hosts by itself; each host feeds its own
# shard of the data. The config's mesh decides data / fsdp / tensor parallelism, e.g.
#   --config.mesh.fsdp=-1 --config.mesh.data=1
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxt2i}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
WORKDIR=${WORKDIR:-gs://YOUR_BUCKET/jaxt2i/run1}
CONFIG=${CONFIG:-configs/base.py:size=paper_base64}
REMOTE_DIR=jaxt2i

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd=${1:-}
shift || true
case "$cmd" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.git --exclude=.venv -czf /tmp/jaxt2i_src.tgz .
    tpu scp /tmp/jaxt2i_src.tgz "$TPU_NAME":/tmp/ --worker=all
    on_all "mkdir -p ${REMOTE_DIR} && tar -C ${REMOTE_DIR} -xzf /tmp/jaxt2i_src.tgz && \
      python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -U pip && \
      pip install 'jax[tpu]' && pip install -e ${REMOTE_DIR}"
    ;;
  train)
    extra=$(printf ' %q' "$@")
    on_all "cd ${REMOTE_DIR} && . ~/venv/bin/activate && \
      python -m jaxt2i.train --config=${CONFIG} --workdir=${WORKDIR}${extra}"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: $0 {create|setup|train [flags]|delete}" >&2
    exit 2
    ;;
esac
