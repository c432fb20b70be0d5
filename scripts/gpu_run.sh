#!/usr/bin/env bash
# kd's GPU checks and benchmarks, run on a CUDA machine from what scripts/gpu_pack.sh packed into
# .gpu/ (no Rust toolchain needed there). PyTorch (python3 with torch + transformers) is the peer.
#
# Usage: scripts/gpu_run.sh PHASE...     logs in $OUT (default /tmp/kd-gpu), a summary last
#   checks  CUDA parity of every op against the CPU, the tiny-BERT golden tests on CUDA, the
#           built-in demo trained with --device cuda
#   bench   the kernel benchmarks (criterion, CUDA only) and PyTorch's on the same shapes; the
#           standard distillation step, kd against PyTorch, on MiniLM-shaped models
#   e2e     needs the MiniLM checkpoints in $KD_MODELS: their golden forward on CUDA, and the
#           SST-2 recipe of issue 3 fine-tuned and distilled with --device cuda, kd and PyTorch
#   verify  the GPU checks of issue 14 in one call of a 15-minute lease, most important first:
#           every parity test (bf16 conversion and softmax-KL, flash attention included), the
#           tiny-BERT golden and bert_outputs on CUDA with and without KD_FLASH_ATTENTION=1, the
#           softmax-KL and attention kernel benches, and kd-cli bench step against PyTorch fp32
#           eager and PyTorch bf16 autocast + SDPA + torch.compile in the same call
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kd-gpu}
mkdir -p "$out"
export KD_ASSETS=$PWD/.gpu/shared KD_REPO=$PWD KD_REQUIRE_CUDA=1 KD_REQUIRE_ASSETS=1
# cudarc dlopens libcublas by name; PyTorch's wheels carry it.
cublas=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name 'libcublas.so.1[0-9]*' -print 2>/dev/null | head -1)
[[ -n $cublas ]] && export LD_LIBRARY_PATH=$(dirname "$cublas"):${LD_LIBRARY_PATH:-}
bin=$PWD/.gpu/bin
summary=()

# step NAME CMD...: runs CMD with its output in $out/NAME.log, prints its tail, records PASS/FAIL.
step() {
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then summary+=("PASS $name ($((SECONDS - t0)) s)"); else summary+=("FAIL $name ($((SECONDS - t0)) s)"); fi
    tail -n 8 "$out/$name.log"
}

# Random-weight models with the MiniLM configs (the step's speed does not depend on the values).
random_models() {
    python3 - "$@" <<'PY'
import sys, shutil
from transformers import BertConfig, BertForSequenceClassification
for name in ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"]:
    cfg = BertConfig.from_pretrained(f".gpu/configs/{name}", num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(f"/tmp/kd-random/{name}")
    shutil.copy(f".gpu/configs/{name}/tokenizer.json", f"/tmp/kd-random/{name}/")
PY
}

checks() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    echo "libcublas: ${cublas:-not found}" | tee -a "$out/gpu.txt"
    step parity "$bin/cuda_parity" --test-threads 1
    step golden_tiny "$bin/golden_bert" tiny_bert --test-threads 1
    step demo_cuda "$bin/kd-cli" distill --device cuda
}

bench() {
    step bench_kernels "$bin/kernels" --bench cuda --warm-up-time 1 --measurement-time 3
    step bench_torch python3 scripts/bench_cuda_torch.py --device cuda
    step random_models random_models
    local m=/tmp/kd-random
    for s in 1 2; do
        step "step_kd_$s" "$bin/kd-cli" bench step --teacher $m/all-MiniLM-L6-v2 --student $m/paraphrase-MiniLM-L3-v2 \
            --device cuda --steps 20 --warmup 3 --json
        step "step_torch_$s" python3 scripts/bench_step_torch.py --teacher $m/all-MiniLM-L6-v2 \
            --student $m/paraphrase-MiniLM-L3-v2 --device cuda --steps 20 --warmup 3
    done
}

e2e() {
    local models=${KD_MODELS:?set KD_MODELS to the folder of the two MiniLM checkpoints}
    step golden_minilm "$bin/golden_bert" minilm --test-threads 1
    local sst2=$KD_ASSETS/data/glue/SST-2 recipe=(--task sst2 --data "$KD_ASSETS/data/glue/SST-2" --max-train 4000 --epochs 2
        --batch 32 --lr 5e-5 --max-len 64 --warmup 0.1 --weight-decay 0.01)
    for seed in 42 43 44; do
        step "finetune_kd_$seed" "$bin/kd-cli" finetune --model "$models/all-MiniLM-L6-v2" "${recipe[@]}" \
            --seed $seed --device cuda --out "/tmp/kd-teacher-$seed" --json
        step "finetune_torch_$seed" python3 scripts/finetune_torch.py --model "$models/all-MiniLM-L6-v2" \
            --data "$sst2" --seed $seed --device cuda
    done
    step distill_kd "$bin/kd-cli" distill --method kd --teacher /tmp/kd-teacher-42 \
        --student "$models/paraphrase-MiniLM-L3-v2" "${recipe[@]}" --seed 42 --device cuda --out /tmp/kd-student --json
}

verify() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    step parity timeout 240 "$bin/cuda_parity" --test-threads 1
    step golden_tiny timeout 60 "$bin/golden_bert" tiny_bert --test-threads 1
    step bert_outputs timeout 60 "$bin/bert_outputs" --test-threads 1
    step golden_families timeout 60 "$bin/golden_families" --test-threads 1
    step golden_tiny_flash env KD_FLASH_ATTENTION=1 timeout 60 "$bin/golden_bert" tiny_bert --test-threads 1
    step bert_outputs_flash env KD_FLASH_ATTENTION=1 timeout 60 "$bin/bert_outputs" --test-threads 1
    step bench_kernels timeout 150 "$bin/kernels" --bench '^(softmax_kl|attention)_fwd_bwd/cuda' --warm-up-time 1 \
        --measurement-time 2
    step random_models random_models
    local pair=(--teacher /tmp/kd-random/all-MiniLM-L6-v2 --student /tmp/kd-random/paraphrase-MiniLM-L3-v2)
    step step_kd timeout 60 "$bin/kd-cli" bench step "${pair[@]}" --device cuda --steps 20 --warmup 3 --json
    step step_kd_flash env KD_FLASH_ATTENTION=1 timeout 60 "$bin/kd-cli" bench step "${pair[@]}" --device cuda \
        --steps 20 --warmup 3 --json
    step step_torch_fp32 timeout 90 python3 scripts/bench_step_torch.py "${pair[@]}" --device cuda --steps 20 --warmup 3
    step step_torch_bf16 timeout 180 python3 scripts/bench_step_torch.py "${pair[@]}" --device cuda --steps 20 \
        --warmup 5 --precision bf16 --attn sdpa --compile
    step step_kd_again timeout 60 "$bin/kd-cli" bench step "${pair[@]}" --device cuda --steps 20 --warmup 3 --json
}

for phase in "$@"; do
    case $phase in
        checks | bench | e2e | verify) $phase ;;
        *) echo "unknown phase $phase (checks, bench, e2e, verify)" >&2; exit 2 ;;
    esac
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
! grep -q '^FAIL' "$out/summary.txt"
