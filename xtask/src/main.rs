//! Project tasks that are not a `cargo build`.
//!
//! `cargo xtask build-kernels [--check]` compiles every `kernels/*.cu` with NVRTC to PTX for
//! `compute_90`, writes `kernels/ptx/<name>.ptx` (committed, so a GPU user needs no CUDA
//! toolkit), runs `ptxas -arch=sm_90 -v` on each and writes the registers, shared memory and
//! spills per kernel to `kernels/ptx/REPORT.md`. `--check` builds into a temporary folder and
//! fails when the committed files differ (stale PTX). Any compile error fails the task.
//!
//! The compiler pieces come from NVIDIA's PyPI wheels, pinned by version and hash to CUDA 13.0
//! (the PTX ISA the lent GPUs' 580 driver loads): `nvidia-cuda-nvrtc` (libnvrtc and the
//! builtins it dlopens) and `nvidia-cuda-nvcc` (for ptxas), installed once with pip into a
//! cache folder. libnvrtc is loaded through cudarc, which dlopens it by name, and libnvrtc
//! dlopens its builtins by name too, so the task re-runs itself with the wheel's library folder
//! first on LD_LIBRARY_PATH.
use std::collections::BTreeMap;
use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

const CUDA_VERSION: &str = "13.0.88";
/// `--hash` lines for pip: the Linux x86-64 and aarch64 wheels of CUDA_VERSION, from PyPI's index.
const WHEELS: [(&str, [&str; 2]); 2] = [
    (
        "nvidia-cuda-nvrtc",
        [
            "ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575",
            "d27f20a0ca67a4bb34268a5e951033496c5b74870b868bacd046b1b8e0c3267b",
        ],
    ),
    (
        "nvidia-cuda-nvcc",
        [
            "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
            "c7ff28f86a24effdc6c034fa15230c549a273e4771b10a7fec14996f8cf3307f",
        ],
    ),
];
const ARCH: &str = "compute_90";
const PTXAS_ARCH: &str = "sm_90";
/// Set in the re-run child, whose LD_LIBRARY_PATH already leads with the wheel's libraries.
const CHILD_MARK: &str = "KD_XTASK_NVRTC_CHILD";
const USAGE: &str = "usage: cargo xtask build-kernels [--check]";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["build-kernels"] => build_kernels(false),
        ["build-kernels", "--check"] => build_kernels(true),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root").to_path_buf()
}

fn build_kernels(check: bool) -> Result<ExitCode> {
    let toolkit = Toolkit::ensure()?;
    if env::var_os(CHILD_MARK).is_none() {
        return toolkit.rerun_with_library_path();
    }
    // SAFETY: only probes whether the shared library can be dlopen'ed.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("libnvrtc not loadable from {} (LD_LIBRARY_PATH is set to it)", toolkit.lib.display());
    }
    let root = workspace_root();
    let kernels = root.join("kernels");
    let committed = kernels.join("ptx");
    let out =
        if check { env::temp_dir().join(format!("kd-ptx-check-{}", std::process::id())) } else { committed.clone() };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let built = build_into(&toolkit, &kernels, &out);
    let result = match (built, check) {
        (Err(e), _) => Err(e),
        (Ok(files), false) => {
            remove_orphans(&files, &out)?;
            eprintln!("wrote {} files to {}", files.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        (Ok(files), true) => compare(&files, &out, &committed),
    };
    if check {
        let _ = fs::remove_dir_all(&out);
    }
    result
}

/// Compiles every `*.cu` of `kernels` into `out`, then writes REPORT.md; returns the file names.
fn build_into(toolkit: &Toolkit, kernels: &Path, out: &Path) -> Result<Vec<String>> {
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels)
        .with_context(|| format!("reading {}", kernels.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    if sources.is_empty() {
        bail!("no .cu files in {}", kernels.display());
    }
    let mut files = Vec::new();
    let mut failed = Vec::new();
    let mut reports = Vec::new();
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).context("non-UTF-8 kernel file name")?.to_string();
        let ptx = match compile(src, kernels) {
            Ok(ptx) => ptx,
            Err(e) => {
                eprintln!("{e:#}");
                failed.push(stem);
                continue;
            }
        };
        let ptx_path = out.join(format!("{stem}.ptx"));
        fs::write(&ptx_path, &ptx).with_context(|| format!("writing {}", ptx_path.display()))?;
        reports.push((stem.clone(), toolkit.ptxas(&ptx_path)?));
        files.push(format!("{stem}.ptx"));
    }
    if !failed.is_empty() {
        bail!("NVRTC failed on {}", failed.join(", "));
    }
    fs::write(out.join("REPORT.md"), report_markdown(&toolkit.ptxas_version()?, &reports))?;
    files.push("REPORT.md".into());
    Ok(files)
}

fn compile(src: &Path, include: &Path) -> Result<String> {
    let code = fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    let name = src.file_name().and_then(|n| n.to_str()).map(String::from);
    let opts = CompileOptions {
        arch: Some(ARCH),
        include_paths: vec![include.to_string_lossy().into_owned()],
        name,
        ..Default::default()
    };
    match compile_ptx_with_opts(code, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => {
            bail!("{}: NVRTC compile error:\n{}", src.display(), log.to_string_lossy())
        }
        Err(e) => bail!("{}: NVRTC: {e}", src.display()),
    }
}

/// PTX files left from a `.cu` that no longer exists.
fn orphans(files: &[String], dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".ptx") && !files.contains(&name) {
            found.push(name);
        }
    }
    Ok(found)
}

fn remove_orphans(files: &[String], dir: &Path) -> Result<()> {
    for name in orphans(files, dir)? {
        eprintln!("removing kernels/ptx/{name} (no source)");
        fs::remove_file(dir.join(name))?;
    }
    Ok(())
}

/// `--check`: every freshly built file must equal the committed one, and no committed PTX may
/// lack a source.
fn compare(files: &[String], fresh: &Path, committed: &Path) -> Result<ExitCode> {
    let mut stale = Vec::new();
    for f in files {
        let new = fs::read(fresh.join(f))?;
        match fs::read(committed.join(f)) {
            Ok(old) if old == new => {}
            Ok(_) => stale.push(format!("{f} differs")),
            Err(_) => stale.push(format!("{f} is missing")),
        }
    }
    if committed.is_dir() {
        stale.extend(orphans(files, committed)?.into_iter().map(|name| format!("{name} has no kernels/*.cu source")));
    }
    if stale.is_empty() {
        eprintln!("kernels/ptx is up to date ({} files)", files.len());
        return Ok(ExitCode::SUCCESS);
    }
    for s in &stale {
        eprintln!("stale: kernels/ptx/{s}");
    }
    eprintln!("run `cargo xtask build-kernels` and commit kernels/ptx");
    Ok(ExitCode::FAILURE)
}

/// The pinned wheels, installed under a cache folder.
struct Toolkit {
    lib: PathBuf,
    ptxas: PathBuf,
}

impl Toolkit {
    /// `KD_CUDA_CACHE`, else `$XDG_CACHE_HOME/kd/cuda-<version>`, else `~/.cache/kd/cuda-<version>`.
    fn dir() -> Result<PathBuf> {
        if let Some(d) = env::var_os("KD_CUDA_CACHE") {
            return Ok(PathBuf::from(d));
        }
        let cache = env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .context("set KD_CUDA_CACHE (no XDG_CACHE_HOME or HOME to put the CUDA wheels under)")?;
        Ok(cache.join("kd").join(format!("cuda-{CUDA_VERSION}")))
    }

    fn ensure() -> Result<Toolkit> {
        let dir = Toolkit::dir()?;
        let cu13 = dir.join("nvidia").join("cu13");
        let toolkit = Toolkit { lib: cu13.join("lib"), ptxas: cu13.join("bin").join("ptxas") };
        if !(toolkit.lib.join("libnvrtc.so.13").is_file() && toolkit.ptxas.is_file()) {
            install_wheels(&dir)?;
        }
        Ok(toolkit)
    }

    /// Runs this same command again with the wheel's libraries first on LD_LIBRARY_PATH (the
    /// dynamic loader reads it only at process start).
    fn rerun_with_library_path(&self) -> Result<ExitCode> {
        let mut paths = vec![self.lib.clone()];
        if let Some(old) = env::var_os("LD_LIBRARY_PATH") {
            paths.extend(env::split_paths(&old));
        }
        let exe = env::current_exe().context("locating the xtask binary")?;
        let status = Command::new(&exe)
            .args(env::args_os().skip(1))
            .env("LD_LIBRARY_PATH", env::join_paths(paths)?)
            .env(CHILD_MARK, "1")
            .status()
            .with_context(|| format!("re-running {}", exe.display()))?;
        Ok(status.code().map_or(ExitCode::FAILURE, |c| ExitCode::from(c.clamp(0, 255) as u8)))
    }

    /// `ptxas -v`'s resource lines for every kernel of one PTX file.
    fn ptxas(&self, ptx: &Path) -> Result<Vec<KernelUsage>> {
        let cubin = ptx.with_extension("cubin");
        let output = Command::new(&self.ptxas)
            .arg(format!("-arch={PTXAS_ARCH}"))
            .arg("-v")
            .arg("-o")
            .arg(&cubin)
            .arg(ptx)
            .output()
            .with_context(|| format!("running {}", self.ptxas.display()))?;
        let _ = fs::remove_file(&cubin);
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("ptxas failed on {}:\n{log}", ptx.display());
        }
        Ok(parse_ptxas(&log))
    }

    fn ptxas_version(&self) -> Result<String> {
        let out = Command::new(&self.ptxas).arg("--version").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("unknown").trim().to_string())
    }
}

fn install_wheels(dir: &Path) -> Result<()> {
    let parent = dir.parent().context("the CUDA cache folder has no parent")?;
    fs::create_dir_all(parent)?;
    let partial = parent.join(format!(".partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    let requirements = partial.join("requirements.txt");
    let mut reqs = String::new();
    for (name, hashes) in WHEELS {
        write!(reqs, "{name}=={CUDA_VERSION}")?;
        for h in hashes {
            write!(reqs, " --hash=sha256:{h}")?;
        }
        reqs.push('\n');
    }
    fs::write(&requirements, reqs)?;
    let target = partial.join("wheels");
    let python: OsString = env::var_os("KD_PYTHON").unwrap_or_else(|| "python3".into());
    eprintln!("fetching CUDA {CUDA_VERSION} NVRTC and ptxas wheels from PyPI into {}", dir.display());
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--require-hashes"])
        .arg("--target")
        .arg(&target)
        .arg("-r")
        .arg(&requirements)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .status()
        .with_context(|| format!("running {} -m pip (set KD_PYTHON to a Python with pip)", python.to_string_lossy()))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&partial);
        bail!("pip could not install the CUDA {CUDA_VERSION} wheels ({status})");
    }
    // Renamed into place only when complete, so an interrupted install is never taken for one.
    let _ = fs::remove_dir_all(dir);
    fs::rename(&target, dir).with_context(|| format!("moving the wheels to {}", dir.display()))?;
    let _ = fs::remove_dir_all(&partial);
    Ok(())
}

#[derive(Default)]
struct KernelUsage {
    name: String,
    registers: u32,
    barriers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Reads ptxas' `-v` lines: "Function properties for K", then "N bytes stack frame, N bytes
/// spill stores, N bytes spill loads" and "Used N registers, used N barriers, N bytes smem, ...".
fn parse_ptxas(log: &str) -> Vec<KernelUsage> {
    let mut kernels: BTreeMap<String, KernelUsage> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            let name = name.trim().to_string();
            kernels.entry(name.clone()).or_insert_with(|| KernelUsage { name: name.clone(), ..Default::default() });
            current = Some(name);
            continue;
        }
        let Some(k) = current.as_ref().and_then(|n| kernels.get_mut(n)) else { continue };
        for part in line.split([',', ':']) {
            let words: Vec<&str> = part.split_whitespace().collect();
            let num = |i: usize| words.get(i).and_then(|w| w.parse::<u32>().ok());
            match words[..] {
                ["Used", n, "registers"] => k.registers = n.parse().unwrap_or(0),
                ["used", n, "barriers"] => k.barriers = n.parse().unwrap_or(0),
                [_, "bytes", "stack", "frame"] => k.stack = num(0).unwrap_or(0),
                [_, "bytes", "spill", "stores"] => k.spill_stores = num(0).unwrap_or(0),
                [_, "bytes", "spill", "loads"] => k.spill_loads = num(0).unwrap_or(0),
                [_, "bytes", "smem"] => k.smem = num(0).unwrap_or(0),
                _ => {}
            }
        }
    }
    kernels.into_values().collect()
}

fn report_markdown(ptxas_version: &str, files: &[(String, Vec<KernelUsage>)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Kernel resource report\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask build-kernels`: NVRTC {CUDA_VERSION} (`--gpu-architecture={ARCH}`), then \
         `ptxas -arch={PTXAS_ARCH} -v` ({ptxas_version}). Static shared memory only: kernels that use \
         dynamic shared memory size it at launch. Spills are bytes per thread.\n"
    );
    let _ = writeln!(
        md,
        "| file | kernel | registers | barriers | static smem (B) | stack (B) | spill stores (B) | spill loads (B) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    for (file, kernels) in files {
        for k in kernels {
            let _ = writeln!(
                md,
                "| {file}.cu | `{}` | {} | {} | {} | {} | {} | {} |",
                k.name, k.registers, k.barriers, k.smem, k.stack, k.spill_stores, k.spill_loads
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::parse_ptxas;

    #[test]
    fn reads_ptxas_resource_lines() {
        let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'b' for 'sm_90'
ptxas info    : Function properties for b
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 112 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 9.934 ms
ptxas info    : Function properties for a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
";
        let k = parse_ptxas(log);
        assert_eq!(k.len(), 2);
        assert_eq!((k[0].name.as_str(), k[0].registers, k[0].barriers, k[0].smem), ("a", 32, 0, 0));
        let b = &k[1];
        assert_eq!((b.name.as_str(), b.registers, b.barriers, b.smem), ("b", 112, 1, 256));
        assert_eq!((b.stack, b.spill_stores, b.spill_loads), (8, 4, 12));
    }
}
