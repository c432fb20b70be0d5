#!/usr/bin/env bash
# Issue 5's evidence for docs/RESULTS.md: the KD methods on GLUE, all-MiniLM-L6-v2 fine-tuned as
# teacher, paraphrase-MiniLM-L3-v2 (or the teacher's layers 0,2,4) as student, seeds 42-44.
#
# Usage: scripts/results.sh OUT_DIR [BLOCK...]      (no BLOCK: all of them, in this order)
#   teachers  L6 fine-tuned per task and seed, kept in OUT_DIR/teachers/TASK-SEED (every other
#             block makes the ones it needs first)
#   core      L3 from its checkpoint: ce and kd on every task; ild, ild --last-layer and cr-ild
#             on ILD_TASKS (default the small ones, cola mrpc rte, where CR-ILD's claims are)
#   layers    student = teacher layers 0,2,4: ce vs kd on LAYERS_TASKS (sst2 cola)
#   mate      mate-kd on MATE_TASKS (sst2 mrpc; kd comes from core), one generator per task from
#             `kd-cli train-generator`
#   noise     on NOISE_TASKS (sst2 cola), the teacher and the student both on labels flipped at
#             each of NOISE_RATES (`kd-cli noise`, the CR-ILD protocol of METHODS.md B 1.4a,
#             whose teacher learns the noisy labels): kd, noisy-coteach, noisy-relabel
#   peer      on PEER_TASKS (sst2 cola), a teacher fine-tuned on 50 gold labels labels the
#             training rows: peer-advised vs kd on its outputs alone (--alpha 1: the paper's
#             beta = 0, no gold term; METHODS.md B 4.2)
#
# Each run appends one JSON line to OUT_DIR/results.jsonl and prints one line. A run whose key
# (block, task, seed, student, method, noise) is already there without an error is skipped, so
# the script resumes; a failed run records the error and the tail of its log, and the rest goes on.
# Logs: OUT_DIR/logs; teacher-logit cache: OUT_DIR/cache. Students are deleted after their run.
# OUT_DIR grows by ~180 MB a teacher (30 of them): keep it off a folder whose files all travel back.
#
# Environment: KD_CLI (default target/release/kd-cli), DEVICE (cuda), KD_MODELS
# (~/.cache/kd/models), KD_ASSETS (../shared: GLUE under data/glue), SEEDS ("42 43 44"),
# TASKS (sst2 cola mrpc rte: every block keeps only these), ROWS (training rows drawn per run,
# 2000), EPOCHS (2), NOISE_RATES ("0.3 0.5"), JOBS (chains of runs sharing the device at once,
# 1), BUDGET_S (start no run after this many seconds), SCRATCH (where students are written,
# OUT_DIR/tmp), SMALL=1 (a smoke test: cpu, 32 rows, 1 epoch, seed 42, sst2 and mrpc).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
shift
blocks=("$@")
[[ ${#blocks[@]} -gt 0 ]] || blocks=(teachers core layers mate noise peer)

if [[ ${SMALL:-0} == 1 ]]; then
    : "${DEVICE:=cpu}" "${SEEDS:=42}" "${TASKS:=sst2 mrpc}" "${ROWS:=32}" "${EPOCHS:=1}" "${GOLD_EPOCHS:=2}"
fi
cli=${KD_CLI:-$root/target/release/kd-cli}
device=${DEVICE:-cuda}
models=${KD_MODELS:-$HOME/.cache/kd/models}
glue=${KD_ASSETS:-$root/../shared}/data/glue
# cudarc dlopens libcublas by name; on the lent image it lies outside the loader's path (docs/GPU.md).
if [[ $device == cuda* ]] && ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.1[0-9]'; then
    cublas=$(compgen -G '/usr/local/cuda*/targets/*/lib/libcublas.so.1[0-9]*' | head -1)
    [[ -n $cublas ]] || cublas=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name 'libcublas.so.1[0-9]*' -print 2>/dev/null | head -1)
    [[ -n $cublas ]] && export LD_LIBRARY_PATH=$(dirname "$cublas"):${LD_LIBRARY_PATH:-}
fi
teacher_base=$models/all-MiniLM-L6-v2
student_base=$models/paraphrase-MiniLM-L3-v2
read -r -a seeds <<<"${SEEDS:-42 43 44}"
read -r -a tasks <<<"${TASKS:-sst2 cola mrpc rte}"
read -r -a noise_rates <<<"${NOISE_RATES:-0.3 0.5}"
# Keys hold rates as Python's %g writes them (0.3, not 0.30).
for i in "${!noise_rates[@]}"; do noise_rates[i]=$(printf '%g' "${noise_rates[i]}"); done
rows=${ROWS:-2000}
epochs=${EPOCHS:-2}
# The low-data teacher sees 50 rows: 4 steps an epoch at batch 16, so it needs more epochs.
gold_epochs=${GOLD_EPOCHS:-20}
budget=${BUDGET_S:-}
results=$out/results.jsonl
scratch=${SCRATCH:-$out/tmp}
mkdir -p "$out/logs" "$out/teachers" "$out/data" "$out/generators" "$scratch"
touch "$results"
[[ -x $cli ]] || { echo "no kd-cli at $cli (cargo build --release -p kd-cli, or set KD_CLI)" >&2; exit 2; }

task_dir() { case $1 in sst2) echo SST-2 ;; cola) echo CoLA ;; mrpc) echo MRPC ;; rte) echo RTE ;; *) return 1 ;; esac; }
# Sentence pairs need the longer window; single sentences fit in 64.
task_len() { case $1 in mrpc | rte) echo 128 ;; *) echo 64 ;; esac; }
# The block's tasks that TASKS keeps.
only() {
    local t u
    for t in "$@"; do for u in "${tasks[@]}"; do if [[ $t == "$u" ]]; then echo "$t"; fi; done; done
}

declare -A done_keys
while IFS= read -r key; do done_keys[$key]=1; done < <(python3 - "$results" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "error" not in r:
        print("|".join([r["block"], r["task"], str(r["seed"]), r["student"], r["method"], f"{r['noise']:g}"]))
PY
)

# run BLOCK TASK SEED STUDENT METHOD NOISE CMD...: runs CMD (a kd-cli command printing --json)
# unless its key is done, records it and prints one line. Returns CMD's success.
run() {
    local block=$1 task=$2 seed=$3 student=$4 method=$5 noise=$6
    shift 6
    local key="$block|$task|$seed|$student|$method|$noise"
    [[ -n ${done_keys[$key]:-} ]] && return 0
    if [[ -n $budget && $SECONDS -ge $budget ]]; then
        echo "$block $task $seed $student $method noise=$noise: not started (BUDGET_S=$budget reached)"
        return 1
    fi
    local log=$out/logs/${key//|/_}
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$@" >"$log.out" 2>"$log.err"
    rc=$?
    t1=$(date +%s.%N)
    RC=$rc T0=$t0 T1=$t1 LOG=$log OUT_DIR=$out MODELS=$models GLUE=$glue CLI=$cli DEV=$device \
        python3 - "$results" "$block" "$task" "$seed" "$student" "$method" "$noise" "$@" <<'PY'
import json, os, re, shlex, sys, time
results, block, task, seed, student, method, noise, *cmd = sys.argv[1:]
env = os.environ
command = shlex.join(cmd)
pattern = command
for path, name in ((env["CLI"], "kd-cli"), (env["OUT_DIR"], "$OUT"), (env["MODELS"], "$KD_MODELS"),
                   (env["GLUE"], "$KD_ASSETS/data/glue")):
    pattern = pattern.replace(path, name)
if student != "-":  # a data-preparation step (student "-") does not vary with the seed
    pattern = re.sub(rf"--seed {seed}\b", "--seed {seed}", pattern)
    pattern = re.sub(rf"-{seed}(?=[/\s]|$)", "-{seed}", pattern)
rec = {"block": block, "task": task, "seed": int(seed), "student": student, "method": method,
       "noise": float(noise), "device": env["DEV"], "seconds": round(float(env["T1"]) - float(env["T0"]), 2)}
out_lines = open(env["LOG"] + ".out", errors="replace").read().splitlines()
result = None
if out_lines and out_lines[-1].startswith("{"):
    try:
        result = json.loads(out_lines[-1])
    except ValueError:
        pass
main = {"cola": "mcc", "mrpc": "f1"}.get(task, "accuracy")
if env["RC"] == "0" and result is not None:
    if "split" in result:
        rec["split"], rec["examples"], rec["train_seconds"] = result["split"], result["examples"], result["seconds"]
        rec["metrics"] = {k: v for k, v in result.items() if k not in ("task", "split", "examples", "seconds")}
        rec["metric"], rec["value"] = main, rec["metrics"].get(main)
    else:
        rec["output"] = result
else:
    tail = open(env["LOG"] + ".err", errors="replace").read().splitlines()[-15:] + out_lines[-5:]
    rec["error"] = f"exit {env['RC']}" if env["RC"] != "0" else "no JSON result on the last line of stdout"
    rec["log_tail"] = "\n".join(tail)
rec["command"], rec["pattern"] = command, pattern
rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
value = rec.get("value")
what = "ERROR " + rec["error"] if "error" in rec else (
    f"{main} {value:.4f}" if isinstance(value, float) else "done" if "metric" not in rec else f"{main} {value}")
print(f"{block} {task} {seed} {student} {method} noise={noise} {what} {rec['seconds']:.1f}s", flush=True)
PY
    local last
    last=$(tail -n 1 "$log.out")
    [[ $rc == 0 && $last == "{"* ]] && done_keys[$key]=1
}

# data_flags TASK [DATA_DIR]: the task, its data and the recipe every training run shares
# (issue 3's: batch 32, lr 5e-5, warm-up 0.1, weight decay 0.01, the last two kd's defaults).
data_flags() {
    local task=$1 data=${2:-$glue/$(task_dir "$1")}
    echo --task "$task" --data "$data" --max-len "$(task_len "$task")"
}
train_flags() { echo --max-train "$rows" --epochs "$epochs" --batch 32 --lr 5e-5 --device "$device" --checkpoint-every 100000 --json; }

# teacher KIND TASK SEED [RATE]: makes sure the teacher exists and sets $tdir. KIND: clean
# (OUT/teachers/TASK-SEED), noise (on the labels of noisy_data TASK RATE), gold50 (50 gold rows).
teacher() {
    local kind=$1 task=$2 seed=$3 rate=${4:-0} block method=teacher data flags
    case $kind in
        clean) tdir=$out/teachers/$task-$seed block=teachers method=finetune data=$glue/$(task_dir "$task")
            flags=$(train_flags) ;;
        noise) noisy_data "$task" "$rate" || return 1
            tdir=$out/teachers/$task-noise$rate-$seed block=noise data=$ndata flags=$(train_flags) ;;
        gold50) tdir=$out/teachers/$task-gold50-$seed block=peer data=$glue/$(task_dir "$task")
            flags="--max-train 50 --epochs $gold_epochs --batch 16 --lr 5e-5 --device $device --checkpoint-every 100000 --json" ;;
    esac
    local key="$block|$task|$seed|L6|$method|$rate"
    [[ -f $tdir/model.safetensors && -n ${done_keys[$key]:-} ]] && return 0
    unset "done_keys[$key]"
    rm -rf "$tdir"
    # shellcheck disable=SC2046 # the flag strings split into words on purpose
    if run "$block" "$task" "$seed" L6 "$method" "$rate" "$cli" finetune --model "$teacher_base" \
        $(data_flags "$task" "$data") $flags --seed "$seed" --out "$tdir"; then
        rm -rf "$tdir/checkpoint"
        return 0
    fi
    rm -rf "$tdir"
    return 1
}

# noisy_data TASK RATE: sets $ndata to a GLUE folder whose train.tsv has labels flipped at RATE
# (noise seed 0: every run sees the same corruption) beside the clean dev.tsv.
noisy_data() {
    local task=$1 rate=$2
    ndata=$out/data/$(task_dir "$task")-noise$rate
    [[ -f $ndata/dev.tsv ]] && return 0
    mkdir -p "$ndata"
    # shellcheck disable=SC2046
    run noise "$task" 0 - noise-file "$rate" "$cli" noise $(data_flags "$task") --rate "$rate" --noise-seed 0 \
        --out "$ndata/train.tsv" --json || return 1
    cp "$glue/$(task_dir "$task")/dev.tsv" "$ndata/"
}

# generator TASK: makes OUT/generators/TASK, MATE-KD's generator: an MLM head trained on the frozen
# pre-trained L6 (not a fine-tuned teacher, so one serves every seed) over the task's first ROWS
# training texts.
generator() {
    local task=$1 dir data gdir=$out/generators/$1
    [[ -f $gdir/model.safetensors ]] && return 0
    dir=$glue/$(task_dir "$task")
    data=$out/data/$(task_dir "$task")-text$rows
    mkdir -p "$data"
    # CoLA's train.tsv has no header row; the others do.
    head -n $((rows + $([[ $task == cola ]] && echo 0 || echo 1))) "$dir/train.tsv" >"$data/train.tsv"
    cp "$dir/dev.tsv" "$data/"
    # shellcheck disable=SC2046
    run mate "$task" 42 - train-generator 0 "$cli" train-generator --model "$teacher_base" \
        $(data_flags "$task" "$data") --device "$device" --seed 42 --out "$gdir" --json
}

# student BLOCK TASK SEED STUDENT METHOD NOISE FLAGS...: one distill run into a scratch folder.
student() {
    local block=$1 task=$2 seed=$3 student=$4 method=$5 noise=$6
    shift 6
    local name=${block}_${task}_${seed}_${student}_${method}_${noise}
    local dir=$scratch/$name
    rm -rf "$dir"
    run "$block" "$task" "$seed" "$student" "$method" "$noise" "$cli" distill "$@" --seed "$seed" \
        --cache-dir "$out/cache" --out "$dir"
    local rc=$?
    [[ -f $dir/metrics.jsonl ]] && cp "$dir/metrics.jsonl" "$out/logs/$name.metrics.jsonl"
    rm -rf "$dir"
    return $rc
}

method_flags() {
    case $1 in
        ild-last) echo --method ild --last-layer ;;
        kd-alpha1) echo --method kd --alpha 1 ;;
        *) echo --method "$1" ;;
    esac
}

wanted() { [[ " ${blocks[*]} " == *" $1 "* ]]; }
# has LIST TASK: whether TASK is one of the (space-separated) LIST that TASKS keeps.
has() {
    local t
    for t in $(only $1); do [[ $t == "$2" ]] && return 0; done
    return 1
}

# The work comes in independent chains, each a teacher and the runs that use it, so JOBS chains
# can share the GPU (small models leave it mostly idle; process start and model load are CPU).

# chain_clean SEED TASK: the clean teacher, then the core, layers and mate runs that use it.
chain_clean() {
    local seed=$1 task=$2 m
    teacher clean "$task" "$seed" || return 0
    if wanted core; then
        for m in ce kd ild ild-last cr-ild; do
            [[ $m == ce || $m == kd ]] || has "${ILD_TASKS:-cola mrpc rte}" "$task" || continue
            # shellcheck disable=SC2046 # the flag strings split into words on purpose
            student core "$task" "$seed" L3 "$m" 0 $(method_flags $m) --teacher "$tdir" --student "$student_base" \
                $(data_flags "$task") $(train_flags)
        done
    fi
    if wanted layers && has "${LAYERS_TASKS:-sst2 cola}" "$task"; then
        for m in ce kd; do
            # shellcheck disable=SC2046
            student layers "$task" "$seed" L6-024 "$m" 0 $(method_flags $m) --teacher "$tdir" --student-layers 0,2,4 \
                $(data_flags "$task") $(train_flags)
        done
    fi
    if wanted mate && has "${MATE_TASKS:-sst2 mrpc}" "$task" && [[ -f $out/generators/$task/model.safetensors ]]; then
        # shellcheck disable=SC2046
        student mate "$task" "$seed" L3 mate-kd 0 --method mate-kd --generator "$out/generators/$task" \
            --teacher "$tdir" --student "$student_base" $(data_flags "$task") $(train_flags)
    fi
}

# chain_noise SEED TASK RATE: the teacher of the noisy labels, then the students on them.
chain_noise() {
    local seed=$1 task=$2 rate=$3 m
    teacher noise "$task" "$seed" "$rate" || return 0
    for m in kd noisy-coteach noisy-relabel; do
        # shellcheck disable=SC2046
        student noise "$task" "$seed" L3 "$m" "$rate" --method "$m" --teacher "$tdir" --student "$student_base" \
            $(data_flags "$task" "$ndata") $(train_flags)
    done
}

# chain_peer SEED TASK: the teacher of 50 gold labels, then the students on its labels.
chain_peer() {
    local seed=$1 task=$2 m
    teacher gold50 "$task" "$seed" || return 0
    for m in kd-alpha1 peer-advised; do
        # shellcheck disable=SC2046
        student peer "$task" "$seed" L3 "$m" 0 $(method_flags $m) --teacher "$tdir" --student "$student_base" \
            $(data_flags "$task") $(train_flags)
    done
}

for b in "${blocks[@]}"; do
    case $b in
        teachers | core | layers | mate | noise | peer) ;;
        *) echo "unknown block $b (teachers core layers mate noise peer)" >&2; exit 2 ;;
    esac
done
parallel=${JOBS:-1}
echo "results.sh: ${blocks[*]} on $device; tasks ${tasks[*]}; seeds ${seeds[*]}; $rows rows, $epochs epochs;" \
    "$parallel at a time; into $out"
lines_before=$(wc -l <"$results")

# What several chains share comes first: the noisy training files and the generators.
if wanted noise; then
    for task in $(only ${NOISE_TASKS:-sst2 cola}); do
        for rate in "${noise_rates[@]}"; do noisy_data "$task" "$rate"; done
    done
fi
if wanted mate; then
    for task in $(only ${MATE_TASKS:-sst2 mrpc}); do generator "$task"; done
fi

# Seed by seed, so a run cut short by BUDGET_S has its first seeds complete.
chains=()
for seed in "${seeds[@]}"; do
    if wanted teachers || wanted core || wanted layers || wanted mate; then
        for task in "${tasks[@]}"; do
            if wanted teachers || wanted core || { wanted layers && has "${LAYERS_TASKS:-sst2 cola}" "$task"; } ||
                { wanted mate && has "${MATE_TASKS:-sst2 mrpc}" "$task"; }; then
                chains+=("chain_clean $seed $task")
            fi
        done
    fi
    if wanted noise; then
        for task in $(only ${NOISE_TASKS:-sst2 cola}); do
            for rate in "${noise_rates[@]}"; do chains+=("chain_noise $seed $task $rate"); done
        done
    fi
    if wanted peer; then
        for task in $(only ${PEER_TASKS:-sst2 cola}); do chains+=("chain_peer $seed $task"); done
    fi
done
for chain in "${chains[@]}"; do
    if [[ $parallel -le 1 ]]; then
        $chain
        continue
    fi
    while [[ $(jobs -rp | wc -l) -ge $parallel ]]; do wait -n; done
    $chain &
done
wait
rmdir "$scratch" 2>/dev/null
python3 - "$results" "$lines_before" "$SECONDS" <<'PY'
import json, sys
new = [json.loads(l) for l in open(sys.argv[1]).read().splitlines()[int(sys.argv[2]):] if l.strip()]
failed = sum("error" in r for r in new)
print(f"results.sh: {len(new) - failed} runs done, {failed} failed; {sys.argv[3]} s")
PY
