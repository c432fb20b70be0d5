//! Test support for every crate: the devices a test runs on. Tests are written once and run on
//! each device this machine has; a GPU test that could not run says so on stderr.
use crate::Device;

/// GPU 0, or `None` after printing "skipped on CUDA: ..." when this machine has none. With
/// `KD_REQUIRE_CUDA` set (on a GPU machine) a missing GPU fails the test instead, so a run that
/// is meant to cover CUDA cannot pass by skipping.
pub fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(std::env::var_os("KD_REQUIRE_CUDA").is_none(), "KD_REQUIRE_CUDA is set, but: {e}");
            eprintln!("skipped on CUDA: no CUDA device ({e})");
            None
        }
    }
}

/// The CPU, then GPU 0 when present (see [`gpu`]).
pub fn devices() -> Vec<Device> {
    std::iter::once(Device::Cpu).chain(gpu()).collect()
}
