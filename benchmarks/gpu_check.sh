#!/bin/bash
# Every GPU figure of this release in one call on a GPU machine (run from the repository root):
#   OUT=DIR bash benchmarks/gpu_check.sh [STEPS]        (STEPS: the long run, default 10000)
# Needs tokenized_dataset/ and valid_dataset/ (README set-up) and a CUDA torch. Packs, after every
# stage, $OUT/gpu_results.tgz with:
#   gpu.txt, tests.log                CUDA-only tests (CUDA graphs survive the recorder, no host sync)
#   run10k/                           the default run with every-step recording: config, run_info,
#                                     trainer_state, rec_meta, report summary.json and figures
#   recording_stats.json              its recording's size (benchmarks/recording_stats.py)
#   train_speed.json / .log           benchmarks/train_speed.py --device cuda
#   resume_eager.json, resume_compiled.json   benchmarks/resume_bound.py
# Each stage has its own time limit; a stage that fails does not stop the later ones.
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
S=/tmp/gpu_stage; rm -rf $S; mkdir -p $S/run10k
STEPS=${1:-10000}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
pack() { tar czf "$OUT/gpu_results.tgz.tmp" -C $S . && mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz"; }
NCPU=$(nproc); HALF=$(( NCPU / 2 )); LO=0-$(( HALF - 1 )); HI=$HALF-$(( NCPU - 1 ))
on() { local cpus=$1; shift; if command -v taskset >/dev/null; then taskset -c "$cpus" "$@"; else "$@"; fi; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $S/gpu.txt
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a $S/gpu.txt; nproc | tee -a $S/gpu.txt

say "1. CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_recorder_graph.py -k cuda -rs 2>&1 | tail -4 | tee $S/tests.log
pack

say "2. the default run, $STEPS steps, every-step bf16 recording (format 2)"
RUN=/tmp/gpu_run; rm -rf $RUN
timeout 420 $PY -m duckling.cli train --run $RUN --max-steps "$STEPS" --eval-dataset valid_dataset \
    --eval-steps 500 > $S/train.log 2>&1; echo "train exit $?"
grep -v -E "it/s\]|s/it\]" $S/train.log | tail -8
for f in config.json run_info.json trainer_state.json final/trainer_state.json; do cp $RUN/$f $S/run10k/ 2>/dev/null; done
cp $RUN/recording/meta.json $S/run10k/rec_meta.json 2>/dev/null
$PY -P benchmarks/recording_stats.py $RUN --json $S/recording_stats.json | tail -20
pack

say "3. report (upper half of the CPUs) beside train_speed (lower half)"
( on $HI timeout 420 $PY -m duckling.cli report $RUN > $S/report.log 2>&1
  echo "report exit $?" >> $S/report.log; cp $RUN/report/summary.json $RUN/report/*.png $S/run10k/ 2>/dev/null ) &
REPORT=$!
on $LO timeout 330 $PY benchmarks/train_speed.py --device cuda --rounds 8 --json $S/train_speed.json \
    > $S/train_speed.log 2>&1; echo "train_speed exit $?"
grep -v -i warn $S/train_speed.log | tail -12
pack

say "4. resume bound (eager, compiled)"
on $LO timeout 90 $PY -P benchmarks/resume_bound.py --device cuda --compile false \
    --json $S/resume_eager.json 2>&1 | tail -4
if [ $(( $(date +%s) - T0 )) -lt ${COMPILED_RESUME_BEFORE_S:-380} ]; then  # three compiled trainings: only with time left
  on $LO timeout 150 $PY -P benchmarks/resume_bound.py --device cuda \
      --json $S/resume_compiled.json 2>&1 | tail -4
else say "compiled resume bound skipped (time)"; fi
pack
say "waiting for the report"
wait $REPORT; tail -3 $S/report.log
pack
say "done"; ls -la $S $S/run10k
