#!/usr/bin/env bash
# The standard distillation step, kd (release build) against PyTorch + HF transformers, on the
# same two checkpoints, shape and step counts; prints both JSON results and kd/PyTorch ratios.
#
# Usage: scripts/bench_step.sh [--batch 32] [--seq 64] [--steps 5] [--warmup 1] [--device cpu]
# Environment: KD_MODELS (folder of all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2, default
# ~/.cache/kd/models), TEACHER / STUDENT (model folders), PYTHON (an interpreter with torch and
# transformers, default python3), THREADS (PyTorch's threads, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

models=${KD_MODELS:-$HOME/.cache/kd/models}
teacher=${TEACHER:-$models/all-MiniLM-L6-v2}
student=${STUDENT:-$models/paraphrase-MiniLM-L3-v2}
python=${PYTHON:-python3}
batch=32 seq=64 steps=5 warmup=1 device=cpu
while (($#)); do
    case $1 in
        --batch) batch=$2 ;;
        --seq) seq=$2 ;;
        --steps) steps=$2 ;;
        --warmup) warmup=$2 ;;
        --device) device=$2 ;;
        *) echo "usage: $0 [--batch N] [--seq N] [--steps N] [--warmup N] [--device cpu|cuda]" >&2; exit 2 ;;
    esac
    shift 2
done
shape=(--batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" --device "$device")

cargo build --release -p kd-cli --quiet
ours=$(target/release/kd-cli bench step --teacher "$teacher" --student "$student" "${shape[@]}" --json | tail -n 1)
echo "kd:      $ours"

status=0
theirs=$("$python" scripts/bench_step_torch.py --teacher "$teacher" --student "$student" "${shape[@]}" \
    --threads "${THREADS:-2}" | tail -n 1) || status=$?
if ((status == 3)); then
    exit 0 # the script said which package is missing
elif ((status != 0)); then
    echo "the PyTorch side failed (status $status)" >&2
    exit "$status"
fi
echo "pytorch: $theirs"

"$python" - "$ours" "$theirs" <<'EOF'
import json
import sys

kd, pt = (json.loads(a) for a in sys.argv[1:3])
print(
    f"kd / pytorch: {kd['seq_per_s'] / pt['seq_per_s']:.2f}x the throughput "
    f"({kd['seq_per_s']:.1f} vs {pt['seq_per_s']:.1f} seq/s), "
    f"{kd['peak_rss_mb'] / pt['peak_rss_mb']:.2f}x the peak RSS "
    f"({kd['peak_rss_mb']:.0f} vs {pt['peak_rss_mb']:.0f} MB)"
)
for phase in ("teacher_forward", "student_forward", "loss", "backward", "optimizer"):
    print(f"  {phase:<16} {kd['phase_seconds'][phase]:8.3f} s vs {pt['phase_seconds'][phase]:8.3f} s")
EOF
