#!/usr/bin/env bash
# Packs what scripts/gpu_run.sh needs on a CUDA machine that has no Rust toolchain and no
# network (the lent GPU box): release binaries of kd-cli, the CUDA parity and golden tests and
# the kernel benchmarks, the test assets, and the MiniLM configs and tokenizer. Everything goes
# to .gpu/ (git-ignored), about 40 MB; carry that folder to the GPU machine.
#
# Usage: scripts/gpu_pack.sh            (KD_ASSETS: the shared assets, default ../shared)
#        scripts/gpu_pack.sh --models   also splits the two MiniLM checkpoints into .gpu-models/
#                                       part-* files of at most 54 MiB, to carry one per call
#                                       (gpu_run.sh --models-from DIR joins them)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${KD_ASSETS:-../shared}
models=${KD_MODELS:-$HOME/.cache/kd/models}

if [[ ${1:-} == --models ]]; then
    rm -rf .gpu-models && mkdir -p .gpu-models
    tar -C "$models" -cf - all-MiniLM-L6-v2 paraphrase-MiniLM-L3-v2 | split -b 54M - .gpu-models/part-
    ls -l .gpu-models
    exit 0
fi

rm -rf .gpu && mkdir -p .gpu/bin .gpu/shared/data/glue .gpu/shared/models .gpu/configs
# Executables cargo built for the named targets, as its JSON messages list them.
executables() { jq -r 'select(.executable != null) | .executable'; }
cargo build --release -p kd-cli
cp target/release/kd-cli .gpu/bin/
cargo test --release --no-run --message-format=json -p kd-kernels --test cuda_parity -p kd --test golden_bert \
    -p kd --test golden_families -p kd-model --test bert_outputs |
    executables | while read -r exe; do cp "$exe" ".gpu/bin/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
cargo bench --no-run --message-format=json -p kd --bench kernels |
    executables | while read -r exe; do cp "$exe" ".gpu/bin/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
strip --strip-debug .gpu/bin/*

cp -r "$shared/golden" .gpu/shared/
for task in SST-2 CoLA MRPC RTE; do cp -r "$shared/data/glue/$task" .gpu/shared/data/glue/; done
cp "$shared/models/fetch.sh" .gpu/shared/models/
for m in all-MiniLM-L6-v2 paraphrase-MiniLM-L3-v2; do
    mkdir -p ".gpu/configs/$m"
    cp "$models/$m/config.json" "$models/$m/tokenizer.json" ".gpu/configs/$m/"
done
du -sh .gpu
ls -l .gpu/bin
