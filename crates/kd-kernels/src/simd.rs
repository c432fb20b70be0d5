//! CPU loops compiled twice, for baseline x86-64 and for AVX2, picked at run time, and the
//! branch-free math they vectorise.

/// Runs `$body`, a function of the named arguments, compiled for AVX2 + FMA where the CPU has them:
/// the workspace builds for baseline x86-64, whose SSE2 lanes hold 4 floats, AVX2's 8. The body
/// must call its element functions by name: LLVM does not inline one reached through a generic
/// `Fn` into the `#[target_feature]` function, and then nothing vectorises. Rust never fuses a
/// multiply and an add on its own, so both builds round alike and give the same bits; code that
/// wants fused steps says so with [`fma`].
/// `with_avx2!(-> T; args => body)` returns the body's value of type `T`.
macro_rules! with_avx2 {
    ($($arg:ident: $ty:ty),* => $body:block) => {
        with_avx2!(-> (); $($arg: $ty),* => $body)
    };
    (-> $ret:ty; $($arg:ident: $ty:ty),* => $body:block) => {{
        #[inline(always)]
        fn each($($arg: $ty),*) -> $ret $body
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                each($($arg),*)
            }
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { avx2($($arg),*) };
        }
        each($($arg),*)
    }};
}
pub(crate) use with_avx2;

/// `a * b + c` rounded once: one instruction in a [`with_avx2`] body on an AVX2 CPU, libm's
/// `fmaf` in the baseline build (slow, but the same correctly rounded bits).
#[inline(always)]
pub(crate) fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// `e^x` for `x <= 88`, flushed to 0 below -87: Cephes' `expf`, `2^n * p(r)` with `|r| <= ln(2) / 2`
/// (relative error about 1e-7).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = if x < -87.0 { -87.0 } else { x };
    // Adding 1.5 * 2^23 rounds to an integer n and leaves n in the low mantissa bits, no conversion.
    let k = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = k - 12_582_912.0;
    // ln 2 in two parts (Cody-Waite): n * 0.693359375 is exact.
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_2e-4;
    let p = fma(p, r, 1.398_199_9e-3);
    let p = fma(p, r, 8.333_452e-3);
    let p = fma(p, r, 4.166_579_6e-2);
    let p = fma(p, r, 0.166_666_65);
    let p = fma(p, r, 0.5);
    let y = fma(p * r, r, r) + 1.0;
    let two_n = f32::from_bits((k.to_bits() << 23).wrapping_add(127 << 23));
    if x < -87.0 {
        0.0
    } else {
        y * two_n
    }
}

/// `sum_i f(x_i)` in eight running sums (vector lanes) added up in a fixed order at the end:
/// the same bits whatever the CPU.
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32], f: impl Fn(usize, f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane += f(c * 8 + i, chunk[i]);
        }
    }
    let start = x.len() - tail.len();
    for (i, &v) in tail.iter().enumerate() {
        lanes[i] += f(start + i, v);
    }
    lanes.iter().sum()
}
