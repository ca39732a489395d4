#!/usr/bin/env bash
# Short GPU re-check after a change to the MAML family's batching: the MAML speed configurations (with their
# gradient check against the plain loop) and the MAML-family Omniglot configurations end to end.
#     METALAB_DATA=/path/to/data bash benchmarks/gpu_recheck.sh [LOGDIR]
set -u
out=${1:-logs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
timeout 100 $py -m benchmarks.maml_speed --device cuda --only sinusoid omniglot >"$out/maml_speed.log" 2>&1
echo "== maml_speed rc=$?"
grep -E "^[a-z]|ms/step" "$out/maml_speed.log"
timeout 150 $py -m benchmarks.device_smoke --device cuda --only maml_omniglot_5w1s fomaml_omniglot_5w1s \
    metasgd_omniglot_5w1s anil_omniglot_5w1s cavia_omniglot_5w1s mamlpp_omniglot_5w1s imaml_omniglot_5w1s \
    >"$out/device_smoke.log" 2>&1
echo "== device_smoke rc=$?"
sed -n '/ ok on /,$p' "$out/device_smoke.log"
grep -E "batching|Error" "$out/device_smoke.log" | head -5
