#!/usr/bin/env bash
# The GPU checks, in one call, for a machine with a CUDA GPU (CI has none; see README "GPU"):
#   1. second-order MAML task batchings against higher (benchmarks.maml_speed --device cuda),
#   2. ProtoNet training speed, metalab against a plain PyTorch loop (benchmarks.omniglot_metric --only speed),
#   3. every configuration in configs/ trained for a few steps and evaluated on the GPU (benchmarks.device_smoke).
# Records merge into benchmarks/results/*.json beside the CPU ones (merged per kind of device); logs go to LOGDIR.
#     METALAB_DATA=/path/to/data bash benchmarks/gpu_checks.sh [LOGDIR]
set -u
out=${1:-logs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

timeout 180 $py -m benchmarks.maml_speed --device cuda >"$out/maml_speed.log" 2>&1
echo "== maml_speed rc=$?"
grep -E "^[a-z]|ms/step" "$out/maml_speed.log" | tail -45

timeout 80 $py -m benchmarks.omniglot_metric --only speed --device cuda --speed-seconds 20 >"$out/protonet_speed.log" 2>&1
echo "== protonet speed rc=$?"
grep "ProtoNet" "$out/protonet_speed.log"

timeout 290 $py -m benchmarks.device_smoke --device cuda >"$out/device_smoke.log" 2>&1
echo "== device_smoke rc=$?"
sed -n '/ ok on /,$p' "$out/device_smoke.log"
