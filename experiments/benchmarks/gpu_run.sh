#!/usr/bin/env bash
# The accelerator benchmark in one command, on a machine whose Python already holds a CUDA
# build of JAX with flax and optax and that cannot download anything (the lent GPU machine:
# Python 3.12, jax/jaxlib 0.11.x; BUILD_NOTES "Speed and memory (issue 17)"):
#
#   bash experiments/benchmarks/gpu_run.sh                    # voc_r101, JSON in results/
#   bash experiments/benchmarks/gpu_run.sh --preset=tiny      # the CPU check, anywhere
#
# Nothing installed is replaced: the few pure-Python / cp312 wheels the project needs and the
# machine lacks (wheels-py312/, fetched with `pip download --python-version 3.12
# --only-binary=:all: --no-deps`) go into a separate folder on PYTHONPATH, and the repository
# runs from its root without being pip-installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=experiments/benchmarks/wheels-py312
EXTRA=${SEMIJAX_EXTRA:-/tmp/semijax-extra}
mkdir -p "$EXTRA" results

# wheel name prefix : module it provides
missing=()
for spec in ml_collections:ml_collections pyyaml:yaml grain:grain array_record:array_record \
            dm_tree:tree etils:etils cloudpickle:cloudpickle more_itertools:more_itertools \
            tensorboardx:tensorboardX protobuf:google.protobuf; do
  prefix=${spec%%:*}
  module=${spec##*:}
  if ! "$PY" -c "import $module" >/dev/null 2>&1; then
    missing+=("$(ls "$WHEELS/$prefix"-*.whl | head -n 1)")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[gpu_run] installing into $EXTRA: ${missing[*]}"
  "$PY" -m pip install --quiet --no-deps --no-index --target "$EXTRA" "${missing[@]}"
fi
export PYTHONPATH="$EXTRA:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax, flax, optax; print('[gpu_run] jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
exec "$PY" -m experiments.benchmarks.accelerator --preset=voc_r101 \
    --out="results/accelerator_$(date +%Y%m%d_%H%M).json" "$@"
