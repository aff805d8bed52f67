#!/usr/bin/env bash
# The GPU epoch-time measurement in one run: dmm_jax and the PyTorch/Pyro reference on the same
# GPU, side by side, as benchmarks/epoch_time.py does on the CPU, with the minutes 5000 epochs
# would take.
#
# It is written for a GPU machine without network access that has jax (CUDA), numpyro, flax,
# optax and torch (CUDA) installed, but not pyro-ppl. Prepare, once, in the repository root of
# a machine that has the network and the JSB data file:
#
#   echo /.device/ >> .git/info/exclude
#   mkdir -p .device/data .device/whl && cp PATH/TO/jsb_chorales.json .device/data/
#   pip download --no-deps -d .device/whl pyro-ppl==1.9.2 pyro-api==0.1.2 numpyro==0.22.0
#
# (pure Python wheels; numpyro as tested, where the GPU image may have an older one), copy the
# repository with .device/ to the GPU machine and run `OUT=DIR bash benchmarks/gpu_check.sh`
# there. The JSON lands in $OUT.
# EPOCHS, REFERENCE_DEVICE and OUT override the defaults (e.g. REFERENCE_DEVICE=cpu EPOCHS=3
# OUT=/tmp/gpu_check try the script on a CPU machine).
set -euo pipefail

EPOCHS="${EPOCHS:-7}"
REFERENCE_DEVICE="${REFERENCE_DEVICE:-cuda}"
OUT="${OUT:?set OUT to a directory for the results}"
SITE="$(mktemp -d)"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    .device/whl/*.whl
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
# Three JAX clients share the GPU (the driver's matmul and two workers) with the reference:
# none may take XLA's default 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"

python3 - <<'EOF' | tee "$OUT/versions.txt"
import jax, numpyro, flax, optax, torch, pyro
print("jax", jax.__version__, jax.devices())
print("numpyro", numpyro.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "pyro", pyro.__version__)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv | tee -a "$OUT/versions.txt"

# float32 matmuls as on the CPU (JAX's default precision lets a GPU use TF32).
python3 benchmarks/epoch_time.py --epochs "$EPOCHS" --data .device/data \
    --reference-device "$REFERENCE_DEVICE" --matmul-precision highest \
    --out "$OUT/epoch_time_gpu.json" 2>&1 | tee "$OUT/epoch_time_gpu.log"
