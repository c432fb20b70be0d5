//! `kd-cli bench step`: the throughput of kd's standard distillation step
//! ([`kd_methods::bench::StandardStep`]) on real checkpoints, with the process's peak memory,
//! in the units `scripts/bench_step_torch.py` reports for PyTorch.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kd_kernels::Device;
use kd_methods::bench::{PhaseTimes, StandardStep, ALPHA, TEMPERATURE};
use kd_model::bert::Bert;
use serde_json::{json, Map, Value};

use crate::args::device;
use crate::model::ModelDir;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Time the standard step: frozen teacher forward, student forward and backward with dropout,
    /// 0.5 * CE + 0.5 * T^2 * KL (T = 2) on a 2-class head, AdamW; random ids, no padding.
    Step(StepArgs),
}

#[derive(clap::Args, Debug)]
struct StepArgs {
    /// The teacher's model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    teacher: PathBuf,
    /// The student's model folder.
    #[arg(long, value_name = "DIR")]
    student: PathBuf,
    /// Examples per step.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch: usize,
    /// Tokens per example.
    #[arg(long, value_name = "N", default_value_t = 64)]
    seq: usize,
    /// Steps timed.
    #[arg(long, value_name = "N", default_value_t = 10)]
    steps: usize,
    /// Steps run before timing (first-touch page faults, caches).
    #[arg(long, value_name = "N", default_value_t = 1)]
    warmup: usize,
    /// Seed of the token ids, labels, fresh heads and dropout masks.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Step(a) => step(a),
    }
}

fn load(dir: &Path, device: &Device) -> Result<(Bert, Vec<u32>)> {
    let model = ModelDir::open(dir)?;
    let bert = Bert::new(model.config.clone(), model.weights(device)?);
    Ok((bert, model.tokenizer.special_ids()))
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap_or(dir.as_os_str()).to_string_lossy().into_owned()
}

fn step(args: StepArgs) -> Result<()> {
    ensure!(args.batch > 0 && args.seq > 0, "--batch and --seq must be at least 1");
    ensure!(args.steps > 0, "--steps must be at least 1");
    let device = device(&args.device)?;
    let (teacher, mut special) = load(&args.teacher, &device).context("loading the teacher")?;
    let (student, student_special) = load(&args.student, &device).context("loading the student")?;
    special.extend(student_special);
    let layers = (teacher.config.num_hidden_layers, student.config.num_hidden_layers);
    let mut bench = StandardStep::new(teacher, student, args.batch, args.seq, args.seed, &special)?;
    eprintln!(
        "standard step on {device}: teacher {} ({} layers, eval), student {} ({} layers, train), {} x {} tokens, \
         loss {:.1} * CE + {ALPHA:.1} * T^2 * KL at T = {TEMPERATURE}",
        name(&args.teacher),
        layers.0,
        name(&args.student),
        layers.1,
        args.batch,
        args.seq,
        1.0 - ALPHA,
    );

    for i in 0..args.warmup {
        let started = Instant::now();
        let report = bench.run_step()?;
        eprintln!("warm-up {}/{}: loss {:.4}, {:.3} s", i + 1, args.warmup, report.loss, secs(started.elapsed()));
    }
    let mut phases = PhaseTimes::default();
    let started = Instant::now();
    for i in 0..args.steps {
        let report = bench.run_step()?;
        eprintln!("step {}/{}: loss {:.4}, {:.3} s", i + 1, args.steps, report.loss, secs(report.phases.total()));
        phases += report.phases;
    }
    let seconds_per_step = secs(started.elapsed()) / args.steps as f64;
    let seq_per_s = args.batch as f64 / seconds_per_step;
    let peak_rss_mb = peak_rss_mb()?;

    if args.json {
        let per_phase: Map<String, Value> =
            phases.named().iter().map(|(n, t)| (n.to_string(), json!(secs(*t) / args.steps as f64))).collect();
        let line = json!({
            "seq_per_s": seq_per_s,
            "seconds_per_step": seconds_per_step,
            "peak_rss_mb": peak_rss_mb,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": device.to_string(),
            "phase_seconds": per_phase,
        });
        return crate::print_line(&line.to_string());
    }
    crate::print_line(&format!(
        "{} steps after {} warm-up: {seq_per_s:.1} seq/s, {seconds_per_step:.3} s/step, peak RSS {peak_rss_mb:.0} MB",
        args.steps, args.warmup
    ))?;
    let total = secs(phases.total());
    for (phase, t) in phases.named() {
        let t = secs(t);
        crate::print_line(&format!(
            "  {:<16} {:>8.3} s/step {:>5.1}%",
            phase,
            t / args.steps as f64,
            100.0 * t / total
        ))?;
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), in MiB.
fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status for VmHWM")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .context("no VmHWM line in /proc/self/status")?;
    Ok(kb / 1024.0)
}
