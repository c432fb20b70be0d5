//! Test support shared by the crates above kd-model: the real MiniLM checkpoints.
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The MiniLM teacher of the tests, 6 layers.
pub const TEACHER: &str = "all-MiniLM-L6-v2";
/// The MiniLM student of the tests, 3 layers.
pub const STUDENT: &str = "paraphrase-MiniLM-L3-v2";

/// The folder holding [`TEACHER`] and [`STUDENT`] (each with `config.json`,
/// `model.safetensors`, `tokenizer.json`), fetched once per process by the shared
/// `models/fetch.sh` into its default place, `$KD_MODELS` or `~/.cache/kd/models` (it checks
/// every file's sha256 and downloads only when one is missing or wrong). `None`, after the skip
/// notice, when the test assets are absent; a failed fetch fails the test.
pub fn minilm_dir() -> Option<PathBuf> {
    let script = kd_kernels::assets::asset("models/fetch.sh")?;
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}{stdout}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // The script's last line of output is the folder.
        PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
    });
    Some(dir.clone())
}

/// A randomly initialised one-layer BERT (hidden 8, 2 heads) with a `num_labels`-class head, on
/// the CPU: for tests of code around a model, whose answers do not depend on what it learned.
pub fn tiny_bert(vocab_size: usize, max_positions: usize, num_labels: usize, seed: u64) -> crate::bert::Bert {
    let mut config: crate::BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": vocab_size, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 12, "max_position_embeddings": max_positions, "initializer_range": 0.5,
    }))
    .expect("a valid tiny config");
    config.set_num_labels(num_labels);
    let weights = crate::BertWeights::init(&config, num_labels, seed, &kd_kernels::Device::Cpu).expect("tiny weights");
    crate::bert::Bert::new(config, weights)
}
