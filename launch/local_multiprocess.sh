#!/usr/bin/env bash
# Run one training job as N local processes (multi-host simulation on one machine).
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- [train flags...]
#   launch/local_multiprocess.sh 2 2 -- --config=configs/base.py:size=tiny --workdir=/tmp/run
#   MODULE=jaxt2i.data.text_cache launch/local_multiprocess.sh 2 1 -- --encoder=T5 ...
#
# Every process runs `python -m $MODULE` (default jaxt2i.train) with the same flags plus the coordinator
# address (127.0.0.1, a free port), its process id and the process count; on CPU, each
# process gets DEVICES_PER_PROCESS simulated devices and gloo collectives. The script waits
# for all processes and exits non-zero if any failed (the others are stopped).
set -euo pipefail

if [ "$#" -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: [MODULE=jaxt2i.train] $0 NUM_PROCESSES DEVICES_PER_PROCESS -- [flags of python -m \$MODULE]" >&2
  exit 2
fi
nproc_=$1
devices=$2
shift 3
python=${PYTHON:-python}
port=${COORDINATOR_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$logdir"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < nproc_; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
    "$python" -m "${MODULE:-jaxt2i.train}" "$@" \
      --coordinator="127.0.0.1:${port}" --num_processes="${nproc_}" --process_id="${i}" \
      >"${logdir}/process_${i}.log" 2>&1 &
  pids+=("$!")
done
echo "started ${nproc_} processes (logs: ${logdir})"

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process ${i} failed; last lines of ${logdir}/process_${i}.log:" >&2
    tail -n 20 "${logdir}/process_${i}.log" >&2 || true
    status=1
    cleanup
  fi
done
exit "$status"
