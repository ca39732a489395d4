#!/usr/bin/env bash
# Omniglot few-shot cells trained side by side on one GPU, M minutes each, one process per cell (the GPU
# counterpart of the 60-minute CPU cells; see README "GPU"). Each cell writes its own results folder under
# logs/gpu/res/; the records are gathered into $OUT/results_gpu.json (OUT defaults to logs/gpu) and the run
# folders' metrics into $OUT/runs.tgz. Run from the repository root:
#     METALAB_DATA=/path/to/data M=5.5 [CELLS=blackbox] bash benchmarks/gpu_fewshot.sh
# Wheels of missing packages may be carried in .whl/ (installed into /tmp/site); a decoded Omniglot cache may be
# carried in .devdata/ (re-keyed by .devdata/prep_cache.py). A guard stops every cell GUARD seconds after start.
set -u
M=${M:-5.5}
GUARD=${GUARD:-525}
OUTDIR=${OUT:-logs/gpu}
PY=${PY:-python3}
mkdir -p "$OUTDIR" logs/gpu
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/gymnasium*.whl .whl/farama*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export METALAB_DATA=${METALAB_DATA:-$PWD/.devdata/data} PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
nvidia-smi -L 2>/dev/null
if [ -f .devdata/prep_cache.py ]; then $PY .devdata/prep_cache.py || exit 1; fi
start=$(date +%s)
go() { name=$1; shift; $PY -m "$@" ${EXTRA:-} --threads 1 --minutes "$M" --results-dir "logs/gpu/res/$name" >"logs/gpu/$name.log" 2>&1 &
  cells="$cells $!"; }
cells=""
case ${CELLS:-fewshot} in
fewshot)
  go maml-5w1s benchmarks.omniglot_maml --only maml-5w1s --runs-dir runs/gpu/maml
  go maml-5w5s benchmarks.omniglot_maml --only maml-5w5s --runs-dir runs/gpu/maml
  for m in fomaml metasgd anil mamlpp; do go "$m-5w5s" benchmarks.omniglot_maml --only "$m-5w5s" --runs-dir runs/gpu/maml; done
  snail() { name=$1; shift; go "snail-$name" benchmarks.omniglot_blackbox --only snail-5w1s --runs-dir "runs/gpu/snail-$name" "$@"; }
  snail tied --set snail.tied_qk_init=true
  snail untied --set snail.tied_qk_init=false
  snail mb4 --set train.meta_batch=4 --set snail.tied_qk_init=true
  snail untied-mb4 --set train.meta_batch=4 --set snail.tied_qk_init=false
  ;;
blackbox)  # every black-box cell as configured, plus the 20-way 5-shot cell with the matching-readout head
  for c in snail-5w1s snail-5w5s snail-20w1s snail-20w5s mann-lstm mann-memory; do
    go "$c" benchmarks.omniglot_blackbox --only "$c" --runs-dir runs/gpu/blackbox
  done
  go snail-20w5s-head benchmarks.omniglot_blackbox --only snail-20w5s --runs-dir runs/gpu/blackbox-head \
    --set snail.label_head_init=5 --set task.train_queries=5
  ;;
*) echo "CELLS must be fewshot or blackbox" >&2; exit 2 ;;
esac
(sleep "$GUARD"; kill -INT $cells 2>/dev/null) &  # only this script's cells, never other runs
guard=$!
sleep 60
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
wait $cells 2>/dev/null
kill "$guard" 2>/dev/null
echo "all done after $(($(date +%s) - start)) s"
$PY - "$OUTDIR" <<'PYEOF'
import glob, json, sys
recs = []
for f in sorted(glob.glob("logs/gpu/res/*/*.json")):
    for r in json.load(open(f)):
        r["gpu_run"] = f.split("/")[-2]
        recs.append(r)
json.dump(recs, open(f"{sys.argv[1]}/results_gpu.json", "w"), indent=1)
for r in recs:
    print(r["gpu_run"], r["task"], r["method"], r["metric"], r["value"], r["ci95"], r["steps"], r["seconds"])
PYEOF
tar czf "$OUTDIR/runs.tgz" --exclude='*.pt' runs/gpu logs/gpu
for f in logs/gpu/*.log; do echo "== $f"; tail -n 3 "$f"; done
