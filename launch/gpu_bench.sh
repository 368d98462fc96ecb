#!/usr/bin/env bash
# The GPU benchmark of the current code on one lent GPU: `python -m jaxt2i.bench` in bfloat16,
# the train / mfu / sample phases (bench_23m, bench_sr22m) and the paper's 2B base step on the
# one device, plus imagen-pytorch's matching phases when it imports there. JSON and logs go to
# OUT_DIR. Sized for 8 minutes of device time (compilation included) on an H100 / H200.
#
#   bash launch/gpu_bench.sh --fetch-wheels        # here, once: wheels the GPU image lacks -> .whl/
#   bash launch/gpu_bench.sh OUT_DIR               # on the GPU machine, in the repository root
#   bash launch/gpu_bench.sh --dry-run OUT_DIR     # on a CPU: the same steps, test-sized models
#
# The GPU image has jax (CUDA), flax, optax, orbax, transformers and torch but not ml-collections,
# grain (with array-record and portpicker) or tensorboardX: --fetch-wheels downloads them for
# CPython 3.12 into .whl/ (git-ignored), which travels with the repository to the GPU machine.
# PHASES (default train,mfu,sample,paper) picks the phases.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
WHEELS=(ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
if [ $# -gt 1 ]; then
  echo "usage: $0 [--fetch-wheels | [--dry-run] [OUT_DIR]]" >&2
  exit 2
fi
out=${1:-${OUT:-bench_gpu}}
mkdir -p "$out"
phases=${PHASES:-train,mfu,sample,paper}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 0 ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/jaxt2i-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/jaxt2i-site"
  fi
  if ! "$py" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
    echo "error: jax sees no GPU here ($("$py" -c 'import jax; print(jax.devices())' 2>&1 | tail -1)); use --dry-run on a CPU" >&2
    exit 2
  fi
  args=(--dtype=bfloat16 --quick)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # each job is its own process: take what it needs
else
  args=(--tiny --quick)
  export JAX_PLATFORMS=cpu
fi

{
  echo "date: $(date -u +%FT%TZ)"
  "$py" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$out/machine.txt"

anchor=()
if [ "$dry" = 0 ] && "$py" -c "import imagen_pytorch" 2>/dev/null; then
  anchor=(--vs_imagen_pytorch)
fi

start=$(date +%s)
set +e
"$py" -m jaxt2i.bench --phases="$phases" "${args[@]}" "${anchor[@]}" --json="$out/bench.json" \
  2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu_bench: phases $phases, exit $rc, $(($(date +%s) - start)) s; results in $out/bench.json" \
  | tee -a "$out/bench.log"
exit "$rc"
