//! CPU loops compiled twice, for baseline x86-64 and for AVX2, picked at run time.

/// Runs `$body`, a function of the named arguments, compiled for AVX2 where the CPU has it: the
/// workspace builds for baseline x86-64, whose SSE2 lanes hold 4 floats, AVX2's 8. The body must
/// call its element functions by name: LLVM does not inline one reached through a generic `Fn`
/// into the `#[target_feature]` function, and then nothing vectorises. No FMA is enabled, so both
/// builds round alike and give the same bits.
macro_rules! with_avx2 {
    ($($arg:ident: $ty:ty),* => $body:block) => {{
        #[inline(always)]
        fn each($($arg: $ty),*) $body
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) {
                each($($arg),*)
            }
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2($($arg),*) };
        }
        each($($arg),*)
    }};
}
pub(crate) use with_avx2;
