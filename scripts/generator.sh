#!/usr/bin/env bash
# The masked-LM generator of docs/RESULTS.md (MATE-KD, --augment) from all-MiniLM-L6-v2, which
# has no MLM head, in the three steps that made it:
#   e1  1 epoch, encoder unfrozen, on SST-2's train sentences, max-len 64, seed 42
#   e3  2 more epochs from e1 on the same text (a fresh warm-up and decay)
#   e4  1 epoch from e3 on all five GLUE train sets' texts (87,807; pairs as tab-separated
#       lines), --group-by-length (RTE's long pairs would pad every random batch), max-len 128,
#       seed 43
# Held out throughout: SST-2's 872 dev sentences. The generator is OUT_DIR/e4 (2.2 hours
# on the 2-core machine; each step's JSON result goes to OUT_DIR/generator.jsonl, and a step
# already there is skipped, so the script resumes).
#
# Usage: scripts/generator.sh OUT_DIR
#
# Environment: KD_CLI (target/release/kd-cli), DEVICE (cpu), KD_MODELS (~/.cache/kd/models),
# KD_ASSETS (../shared: GLUE under data/glue), ROWS (all: the first ROWS texts of each file, to
# try the recipe quickly).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -eq 1 ]] || { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
cli=${KD_CLI:-$root/target/release/kd-cli}
device=${DEVICE:-cpu}
models=${KD_MODELS:-$HOME/.cache/kd/models}
glue=${KD_ASSETS:-$root/../shared}/data/glue
rows=${ROWS:-}

# The text columns of each train file (header rows dropped; CoLA has none).
texts() { # FILE HEADER_LINES COLUMNS
    tail -n +"$(($2 + 1))" "$1" | cut -f"$3" | awk -v n="$rows" 'n == "" || NR <= n'
}
mkdir -p "$out/text"
texts "$glue/SST-2/train.tsv" 1 1 >"$out/text/sst2_train.txt"
texts "$glue/SST-2/dev.tsv" 1 1 >"$out/text/sst2_dev.txt"
{
    cat "$out/text/sst2_train.txt"
    texts "$glue/CoLA/train.tsv" 0 4
    texts "$glue/MRPC/train.tsv" 1 4,5
    texts "$glue/RTE/train.tsv" 1 2,3
    texts "$glue/STS-B/train.tsv" 1 8,9
} >"$out/text/glue_train.txt"

step() { # NAME FROM TEXT FLAGS...
    local name=$1 from=$2 text=$3
    shift 3
    grep -q "^{\"step\": \"$name\"" "$out/generator.jsonl" 2>/dev/null && return
    local t0=$SECONDS
    "$cli" train-generator --model "$from" --out "$out/$name" --text "$out/text/$text" \
        --held-out "$out/text/sst2_dev.txt" --unfreeze --device "$device" --json "$@" \
        >"$out/$name.out" 2>"$out/$name.err"
    echo "{\"step\": \"$name\", \"seconds\": $((SECONDS - t0)), \"result\": $(tail -n 1 "$out/$name.out")}" \
        >>"$out/generator.jsonl"
    tail -n 1 "$out/generator.jsonl"
}
step e1 "$models/all-MiniLM-L6-v2" sst2_train.txt --epochs 1 --max-len 64
step e3 "$out/e1" sst2_train.txt --epochs 2 --max-len 64
step e4 "$out/e3" glue_train.txt --epochs 1 --seed 43 --group-by-length
