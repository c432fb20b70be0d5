#!/usr/bin/env bash
# Issue 11's evidence for docs/RESULTS.md: does a teacher labelling extra text make KD pay off?
# SST-2, all-MiniLM-L6-v2 teacher, paraphrase-MiniLM-L3-v2 student (from its checkpoint).
#
# Usage: scripts/transfer.sh OUT_DIR [METHOD...]      (default: ce kd)
#
# The split (seeded, fixed for every run): TEST_ROWS (2000) rows of SST-2's train file are the
# held-out test set; GOLD_ROWS (1000) of the rest are the student's labelled rows; the remaining
# rows' sentences (64,349) are --unlabeled transfer text. GLUE's dev set is used only to pick the
# best checkpoint (OUT/best) of each run; every number reported is on the held-out test set.
#   teacher  L6 fine-tuned on every train row outside the test set (TEACHER_EPOCHS, 1), best on dev
#   ce       the student on the gold rows alone (CE_EPOCHS, 10: a small set needs more passes)
#   kd       the student on the gold rows plus the transfer text (KD_EPOCHS, 1), a = 0.5, T = 2
#   ild, cr-ild  the same data through their stages (stage 1 also on the transfer text): ild's
#            stage 1 runs 1 epoch; cr-ild's runs CR_ILD_STAGE1_EPOCHS (2), because its consistency
#            weight ramps by 0-based epoch (0 in the first) and a 1-epoch stage 1 would make cr-ild
#            mixup ILD with the consistency term never acting
# Methods that make their own extra text, on the gold rows alone (CE_EPOCHS), against kd-gold:
#   kd-gold     kd on the gold rows alone
#   kd-augment  kd on the gold rows plus AUGMENT (4) TinyBERT-style copies of each from GENERATOR
#   mate-kd     MATE-KD with GENERATOR (a train-generator folder)
# and the label-noise methods on the same gold rows, against kd-gold too (the labels are clean
# here: the question is what they cost when there is no noise to mitigate):
#   slkd, peer-advised, noisy-relabel, noisy-coteach
# Students batch by length (--group-by-length: a third of the padding on SST-2's short texts).
# Each student is run for every seed in SEEDS (42 43 44 45 46); results are paired by seed.
# One JSON line a run goes to OUT_DIR/results.jsonl (a run already there is skipped, so the
# script resumes); scripts/transfer_table.py turns it into the tables.
#
# Environment: KD_CLI (target/release/kd-cli), DEVICE (cpu), KD_MODELS (~/.cache/kd/models),
# KD_ASSETS (../shared: GLUE under data/glue), SEEDS, TEST_ROWS, GOLD_ROWS, TEACHER_EPOCHS,
# CE_EPOCHS, KD_EPOCHS, CR_ILD_STAGE1_EPOCHS, MAX_LEN (64), GENERATOR, AUGMENT.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
methods=("$@")
[[ ${#methods[@]} -gt 0 ]] || methods=(ce kd)
cli=${KD_CLI:-$root/target/release/kd-cli}
device=${DEVICE:-cpu}
models=${KD_MODELS:-$HOME/.cache/kd/models}
glue=${KD_ASSETS:-$root/../shared}/data/glue/SST-2
read -r -a seeds <<<"${SEEDS:-42 43 44 45 46}"
max_len=${MAX_LEN:-64}
results=$out/results.jsonl
mkdir -p "$out/logs" "$out/runs"
touch "$results"
[[ -x $cli ]] || { echo "no kd-cli at $cli (cargo build --release -p kd-cli, or set KD_CLI)" >&2; exit 2; }

# The split, written once.
data=$out/data
if [[ ! -f $data/done ]]; then
    mkdir -p "$data/teacher" "$data/gold" "$data/test"
    python3 - "$glue" "$data" "${TEST_ROWS:-2000}" "${GOLD_ROWS:-1000}" <<'PY'
import random, sys
glue, data, test_rows, gold_rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lines = open(f"{glue}/train.tsv", encoding="utf-8").read().splitlines()
header, rows = lines[0], [l for l in lines[1:] if l.strip()]
order = list(range(len(rows)))
random.Random(0).shuffle(order)
test, gold, rest = order[:test_rows], order[test_rows:test_rows + gold_rows], order[test_rows + gold_rows:]
def write(path, idx):
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "\n" + "".join(rows[i] + "\n" for i in sorted(idx)))
dev = open(f"{glue}/dev.tsv", encoding="utf-8").read()
write(f"{data}/teacher/train.tsv", gold + rest)
write(f"{data}/gold/train.tsv", gold)
write(f"{data}/test/train.tsv", gold)
write(f"{data}/test/dev.tsv", test)  # `eval --split dev` on this folder reads the test set
for d in ("teacher", "gold"):
    open(f"{data}/{d}/dev.tsv", "w", encoding="utf-8").write(dev)
with open(f"{data}/unlabeled.txt", "w", encoding="utf-8") as f:
    f.write("".join(rows[i].split("\t")[0] + "\n" for i in sorted(rest)))
print(f"split: {len(test)} test, {len(gold)} gold, {len(rest)} transfer rows")
PY
    touch "$data/done"
fi

done_run() { grep -q "\"run\": \"$1\"" "$results"; }

# record METHOD SEED MODEL_DIR SECONDS: the model's test accuracy (and its dev accuracy) as one line.
record() {
    local method=$1 seed=$2 model=$3 seconds=$4 test dev
    test=$("$cli" eval --model "$model" --task sst2 --data "$data/test" --max-len "$max_len" --device "$device" --json | tail -1)
    dev=$("$cli" eval --model "$model" --task sst2 --data "$data/gold" --max-len "$max_len" --device "$device" --json | tail -1)
    python3 - "$results" "$method" "$seed" "$seconds" "$test" "$dev" <<'PY'
import json, sys
results, method, seed, seconds, test, dev = sys.argv[1:]
name = method if method == "teacher" else f"{method}-{seed}"
rec = {"run": name, "method": method, "seed": int(seed), "train_seconds": float(seconds),
       "test_accuracy": json.loads(test)["accuracy"], "dev_accuracy": json.loads(dev)["accuracy"]}
open(results, "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec))
PY
}

teacher=$out/runs/teacher
if ! done_run teacher; then
    t0=$SECONDS
    "$cli" finetune --model "$models/all-MiniLM-L6-v2" --task sst2 --data "$data/teacher" --out "$teacher" \
        --epochs "${TEACHER_EPOCHS:-1}" --max-len "$max_len" --eval-every 500 --seed 42 --device "$device" \
        --json >"$out/logs/teacher.out" 2>"$out/logs/teacher.err"
    record teacher 42 "$teacher/best" $((SECONDS - t0))
fi

for seed in "${seeds[@]}"; do
    for method in "${methods[@]}"; do
        name=$method-$seed
        done_run "$name" && continue
        run=$out/runs/$name
        common=(--teacher "$teacher/best" --student "$models/paraphrase-MiniLM-L3-v2" --task sst2 --data "$data/gold"
            --out "$run" --max-len "$max_len" --seed "$seed" --device "$device" --cache-dir "$out/cache" --group-by-length --json)
        gold_only=(--epochs "${CE_EPOCHS:-10}" --eval-every 30)
        transfer=(--epochs "${KD_EPOCHS:-1}" --eval-every 250 --unlabeled "$data/unlabeled.txt")
        flag=${method%-gold}
        flag=${flag%-augment}
        case $method in
            ce | kd-gold | slkd | peer-advised | noisy-relabel | noisy-coteach) extra=("${gold_only[@]}") ;;
            kd) extra=("${transfer[@]}") ;;
            ild) extra=("${transfer[@]}" --stage1-epochs 1) ;;
            cr-ild) extra=("${transfer[@]}" --stage1-epochs "${CR_ILD_STAGE1_EPOCHS:-2}") ;;
            kd-augment) extra=("${gold_only[@]}" --augment "${AUGMENT:-4}" --generator "${GENERATOR:?set GENERATOR}") ;;
            mate-kd) extra=("${gold_only[@]}" --generator "${GENERATOR:?set GENERATOR}") ;;
            *) echo "unknown method $method" >&2; exit 2 ;;
        esac
        t0=$SECONDS
        "$cli" distill --method "$flag" "${common[@]}" "${extra[@]}" >"$out/logs/$name.out" 2>"$out/logs/$name.err"
        record "$method" "$seed" "$run/best" $((SECONDS - t0))
        rm -rf "$run/checkpoint"
    done
done
