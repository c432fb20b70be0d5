//! `kd-cli distill` with no arguments: the built-in demonstration (kd_methods::demo), printed as
//! a table for people, or as one JSON object per row with `--json`.
use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kd_kernels::Device;
use kd_methods::demo::{self, DemoConfig};
use kd_methods::trainer::Event;

pub fn run(json: bool, device: Device) -> Result<()> {
    eprintln!(
        "kd demo: a synthetic sentiment task (negation flips a word's polarity). A 4-layer teacher learns from \
         4000 labels; a 1-layer student gets 200 labels, then the teacher's soft labels on 4000 unlabelled texts \
         (on {device})."
    );
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
    let rows = demo::run(&DemoConfig { device, ..DemoConfig::default() }, &mut |run, event| {
        if let Event::Step { step, total_steps, loss, examples_per_s, .. } = event {
            bar.set_message(format!(
                "{run}: step {step}/{total_steps}  loss {:.4}  {examples_per_s:.0} ex/s",
                loss.total
            ));
            bar.tick();
        }
    })?;
    bar.finish_and_clear();
    if json {
        for row in &rows {
            crate::print_line(&serde_json::to_string(row)?)?;
        }
        return Ok(());
    }
    crate::print_line(&format!(
        "{:<16} {:<7} {:>10} {:>9} {:>11} {:>9} {:>8} {:>10}",
        "model", "method", "params", "labelled", "unlabelled", "dev acc", "train s", "ex/s"
    ))?;
    for r in &rows {
        crate::print_line(&format!(
            "{:<16} {:<7} {:>10} {:>9} {:>11} {:>9.3} {:>8.1} {:>10.0}",
            r.model,
            r.method,
            r.parameters,
            r.labelled_examples,
            r.unlabelled_examples,
            r.dev_accuracy,
            r.train_seconds,
            r.train_examples_per_s
        ))?;
    }
    Ok(())
}
