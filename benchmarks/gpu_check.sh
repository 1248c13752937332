#!/bin/bash
# Every GPU figure of issue 20 (the recording in a writer process) in one call under 9 minutes, on a GPU
# machine (run from the repository root):
#   OUT=DIR bash benchmarks/gpu_check.sh [STEPS]        (STEPS: the long run, default 10000)
# Needs tokenized_dataset/ and valid_dataset/ (README set-up) and a CUDA torch. Writes $OUT/gpu_check.json
# (the figures, each with its target) and, after every stage, $OUT/gpu_results.tgz with:
#   gpu.txt, tests.log                CUDA-only tests (CUDA graphs survive the recorder, no host sync)
#   ring.json                         the shared ring registered as pinned memory: non-blocking copies
#                                     straight into the writer process's slots (is_pinned, steps/s, bytes)
#   compaction_gil.txt                the writer process beside a Python-bound loop (auto worker processes)
#   run10k/                           the default run with every-step recording: config, run_info,
#                                     trainer_state, rec_meta, report summary.json and figures
#   recording_stats.json              its recording's size (benchmarks/recording_stats.py)
#   train_speed.json / .log           benchmarks/train_speed.py --device cuda: recording_overhead_ratio
#                                     (recorded and unrecorded blocks interleaved), recording steps/s,
#                                     trainer_vs_plain_loop_ratio, speedup_vs_naive_trainer
#   resume_eager.json                 benchmarks/resume_bound.py (only with time left)
# Every stage has its own time limit and is skipped when the whole call would pass BUDGET_S (510 s);
# a stage that fails does not stop the later ones.
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
S=/tmp/gpu_stage; rm -rf $S; mkdir -p $S/run10k
STEPS=${1:-10000}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-510}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
limit() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; echo $(( want > 0 ? want : 1 )); }
pack() { tar czf "$OUT/gpu_results.tgz.tmp" -C $S . && mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz"; }
NCPU=$(nproc); HALF=$(( NCPU / 2 )); LO=0-$(( HALF - 1 )); HI=$HALF-$(( NCPU - 1 ))
on() { local cpus=$1; shift; if command -v taskset >/dev/null; then taskset -c "$cpus" "$@"; else "$@"; fi; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $S/gpu.txt
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a $S/gpu.txt; nproc | tee -a $S/gpu.txt

say "1. the pinned ring: non-blocking copies into the writer process's shared slots"
timeout $(limit 60) $PY - > $S/ring.log 2>&1 <<'EOF'
import json, tempfile, time
import numpy as np, torch
from duckling.recording.process import WriterProcess, step_fields
from duckling.recording.reader import Recording
from duckling.training.recorder import _Sink
V, D = 8192, 128
run = tempfile.mkdtemp() + "/run"
wp = WriterProcess(run, dict(shape=(V, D), n_live=6144, dtype="bf16", every=1),
                   step_fields(("wte",), (V, D), "bf16", 6144, probe=False), 8, procs=0, defer=False)
sink = _Sink(wp, torch.device("cuda"))
pinned = all(v.is_pinned() for slot in sink.views for v in slot.values())
scal = torch.randn(4 * V + D, device="cuda")
W = torch.randn(V, D, device="cuda").bfloat16()
n, t0 = 600, time.perf_counter()
for s in range(n):
    W[s % V] += 1
    sink.submit(s, 1e-4, {"scalars": scal, "snap/wte/u16": W.view(torch.int16)}, True)
sink.drain()
dt = time.perf_counter() - t0
sink.close("complete")
rec = Recording(run)
ok = rec.scalar_steps.tolist() == list(range(n)) and np.array_equal(
    rec.snapshot(n - 1), W.float().cpu().numpy())
out = {"ring_is_pinned": pinned, "ring_steps_per_s": round(n / dt, 1), "ring_readback_exact": bool(ok),
       "slot_bytes": wp.ring.slot_bytes}
print(json.dumps(out))
EOF
echo "ring exit $?"; tail -3 $S/ring.log; tail -1 $S/ring.log > $S/ring.json
pack

say "2. CUDA tests"
timeout $(limit 150) $PY -m pytest -q -p no:cacheprovider tests/test_recorder_graph.py -k cuda -rs 2>&1 | tail -4 | tee $S/tests.log
pack

say "3. the default run, $STEPS steps, every-step bf16 recording (writer process, auto worker processes)"
RUN=/tmp/gpu_run; rm -rf $RUN
timeout $(limit 200) $PY -m duckling.cli train --run $RUN --max-steps "$STEPS" --eval-dataset valid_dataset \
    --eval-steps 500 > $S/train.log 2>&1; echo "train exit $?"
grep -v -E "it/s\]|s/it\]" $S/train.log | tail -6
for f in config.json run_info.json trainer_state.json final/trainer_state.json; do cp $RUN/$f $S/run10k/ 2>/dev/null; done
cp $RUN/recording/meta.json $S/run10k/rec_meta.json 2>/dev/null
timeout $(limit 40) $PY -P benchmarks/recording_stats.py $RUN --json $S/recording_stats.json | tail -6
pack

say "4. report (upper half of the CPUs) beside train_speed (lower half), then the writer beside Python"
( on $HI timeout $(limit 240) $PY -m duckling.cli report $RUN > $S/report.log 2>&1
  echo "report exit $?" >> $S/report.log; cp $RUN/report/summary.json $RUN/report/*.png $S/run10k/ 2>/dev/null ) &
REPORT=$!
on $LO timeout $(limit 200) $PY benchmarks/train_speed.py --device cuda --rounds 6 --json $S/train_speed.json \
    > $S/train_speed.log 2>&1; echo "train_speed exit $?"
grep -v -i warn $S/train_speed.log | tail -12
pack
on $LO timeout $(limit 45) $PY -P benchmarks/compaction_gil.py --seconds 6 --procs 4 > $S/compaction_gil.txt 2>&1
cat $S/compaction_gil.txt | tail -3
say "waiting for the report"
wait $REPORT; tail -3 $S/report.log
pack

if [ "$(left)" -gt 100 ]; then  # the resume bound of the previous check, only with time left
  say "resume bound (eager)"
  on $LO timeout $(limit 90) $PY -P benchmarks/resume_bound.py --device cuda --compile false \
      --json $S/resume_eager.json 2>&1 | tail -4
  pack
else say "resume bound skipped (time)"; fi

say "5. figures -> $OUT/gpu_check.json"
$PY - "$S" "$OUT/gpu_check.json" <<'EOF'
import json, sys
from pathlib import Path
S, out = Path(sys.argv[1]), sys.argv[2]
def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None
fig = {"stages_dir": str(S)}
ring = load(S / "ring.json") or {}
fig.update(ring)
ts = load(S / "train_speed.json") or {}
for k, v in ts.get("ratios", {}).items():
    fig[k] = round(v["best"], 3)
    fig[k + "_per_round_median"] = round(v["median"], 3)
if ts:
    fig["recording_steps_per_s"] = round(ts["recording_steps_per_s"], 1)
    fig["unrecorded_steps_per_s"] = round(ts["steps_per_s"]["duckling"]["best_block"], 1)
    fig["plain_loop_steps_per_s"] = round(ts["steps_per_s"]["plain"]["best_block"], 1)
for line in (S / "compaction_gil.txt").read_text().splitlines() if (S / "compaction_gil.txt").exists() else []:
    k, _, v = line.partition(":")
    if k.strip() in ("writer_steps_per_s_alone", "writer_steps_per_s_beside_python", "python_loop_slowdown"):
        fig["gil_" + k.strip()] = float(v)
new, ref = load(S / "run10k" / "summary.json"), load("docs/results/h200_10k/summary.json")
if new and ref:
    def close3(a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return f"{a:.3g}" == f"{b:.3g}"
        return a == b
    keys = [k for k, v in ref.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    diff = {k: [new.get(k), ref[k]] for k in keys if not close3(new.get(k), ref[k])}
    fig["summary_keys_compared"], fig["summary_differs_at_3_digits"] = len(keys), diff
rm = load(S / "run10k" / "rec_meta.json") or {}
fig["run10k_recording_status"], fig["run10k_last_step"] = rm.get("status"), rm.get("last_step")
fig["targets"] = {"recording_overhead_ratio": ">= 0.95", "recording_steps_per_s": ">= 300 (aim 500)",
                  "trainer_vs_plain_loop_ratio": ">= 0.95", "speedup_vs_naive_trainer": ">= 3",
                  "summary_differs_at_3_digits": "{}", "ring_is_pinned": "true"}
Path(out).write_text(json.dumps(fig, indent=1))
print(json.dumps(fig, indent=1))
EOF
cp "$OUT/gpu_check.json" $S/ 2>/dev/null; pack
say "done"; ls -la $S $S/run10k
