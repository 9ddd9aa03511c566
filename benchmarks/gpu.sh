#!/usr/bin/env bash
# On a CUDA machine: the GPU tests, then dpclip vs Opacus vs non-private on the GPU (CNN and transformer, batch
# 256), in float32 and under bf16 autocast; results in benchmarks/results/compare_opacus_full_cuda{,_bf16}.{json,md,png}.
#   bash benchmarks/gpu.sh            # ~10 minutes on one recent GPU
#   REPEATS=1 STEPS=5 bash benchmarks/gpu.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPEATS=${REPEATS:-3}
STEPS=${STEPS:-20}
nvidia-smi -L
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.cuda.get_device_name(0))"
# the GPU tests (noise drawn on the device, CUDA step = CPU step) and the tests of the paths they use
"$PY" -m pytest -q -p no:cacheprovider tests/dpclip/test_gpu.py tests/dpclip/test_mixed_precision.py tests/dpclip/test_clipping_noise.py tests/dpclip/test_secure_noise.py
for precision in off bf16; do
  "$PY" benchmarks/compare_opacus.py --device cuda --models cnn transformer --repeats "$REPEATS" --steps "$STEPS" \
    --libraries nonprivate dpclip opacus-hooks opacus-ghost --autocast "$precision"
done
