//! Where tests find the shared test assets (GLUE data, golden references, the MiniLM models).
//!
//! `KD_ASSETS` names the folder; by default it is `shared` beside the workspace checkout. Without
//! it a test prints a loud "skipped: no test assets" and returns, so `cargo test` passes on a
//! user's fresh machine; with `KD_REQUIRE_ASSETS=1` (set by CI) a missing asset fails the test.
use std::path::PathBuf;

/// The assets folder, if it exists.
pub fn assets_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("KD_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    dir.is_dir().then(|| dir.canonicalize().unwrap_or(dir))
}

/// True when CI demands every asset-backed test to run.
pub fn assets_required() -> bool {
    std::env::var("KD_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// The asset at `relative` inside the assets folder, or `None` after printing the skip notice.
/// Panics (failing the test) instead when `KD_REQUIRE_ASSETS=1`.
pub fn asset(relative: &str) -> Option<PathBuf> {
    let found = assets_dir().map(|d| d.join(relative)).filter(|p| p.exists());
    if found.is_none() {
        assert!(!assets_required(), "KD_REQUIRE_ASSETS=1 but test asset '{relative}' is missing (set KD_ASSETS)");
        eprintln!("skipped: no test assets ({relative} not found; set KD_ASSETS)");
    }
    found
}
