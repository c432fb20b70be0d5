//! Criterion benchmark of kd's standard distillation step (`kd_methods::bench::StandardStep`:
//! all-MiniLM-L6-v2 teacher forward, paraphrase-MiniLM-L3-v2 student forward + backward with
//! dropout, logit-KD loss, AdamW) at a small shape, on the CPU. `kd-cli bench step` times the
//! full-size step (batch 32 x 64 tokens) against PyTorch (`scripts/bench_step.sh`).
//!
//! `cargo bench --bench step`; needs the test assets (`KD_ASSETS`), else it says so and skips.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kd_kernels::Device;
use kd_methods::bench::StandardStep;
use kd_model::bert::Bert;
use kd_model::testing::{minilm_dir, STUDENT, TEACHER};
use kd_model::{BertConfig, BertWeights, Tokenizer};

const BATCH: usize = 8;
const SEQ: usize = 32;

fn load(dir: &std::path::Path) -> (Bert, Vec<u32>) {
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = BertWeights::load(&dir.join("model.safetensors"), &config, &Device::Cpu).unwrap();
    let special = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap().special_ids();
    (Bert::new(config, weights), special)
}

fn bench_step(c: &mut Criterion) {
    let Some(dir) = minilm_dir() else { return };
    let (teacher, special) = load(&dir.join(TEACHER));
    let (student, _) = load(&dir.join(STUDENT));
    let mut step = StandardStep::new(teacher, student, BATCH, SEQ, 42, &special).unwrap();
    let mut group = c.benchmark_group("standard_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(format!("cpu/{BATCH}x{SEQ}"), |b| b.iter(|| step.run_step().unwrap()));
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
