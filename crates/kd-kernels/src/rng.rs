//! Seeded randomness. Element-wise ops (dropout, Gumbel noise) draw from a counter-based
//! generator, `uniform(seed, index)`, so the CPU and a CUDA kernel produce the same mask for the
//! same (seed, element) without sharing state; sequential uses (shuffling, initialisation) use
//! [`Rng`], a SplitMix64-seeded xoshiro256++.

use crate::simd::with_avx2;

/// SplitMix64 finaliser: a bijective 64-bit mix with good avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from (seed, index), with 24 bits of precision (exact in f32).
#[inline]
pub fn uniform(seed: u64, index: u64) -> f32 {
    Uniforms::new(seed).at(index)
}

/// The counter-based draws of one seed, `at(i) == uniform(seed, i)`, with the seed's own mix
/// done once rather than per element.
#[derive(Clone, Copy, Debug)]
pub struct Uniforms {
    key: u64,
}

impl Uniforms {
    pub fn new(seed: u64) -> Uniforms {
        Uniforms { key: mix64(seed ^ 0x9e37_79b9_7f4a_7c15) }
    }

    #[inline(always)]
    pub fn at(self, index: u64) -> f32 {
        // The top 24 bits convert exactly through i32, which (unlike u64) SIMD converts natively.
        ((mix64(self.key.wrapping_add(index)) >> 40) as i32) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// `out[j] = self.at(first + j)`, four lanes wide where the CPU has AVX2.
    pub fn fill(self, first: u64, out: &mut [f32]) {
        let key = self.key;
        with_avx2!(key: u64, first: u64, out: &mut [f32] => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = Uniforms { key }.at(first.wrapping_add(j as u64));
            }
        });
    }
}

/// Sequential generator for shuffles, sampling and weight initialisation.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix64(x)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n); n must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_deterministic_and_in_range() {
        let draws: Vec<f32> = (0..10_000).map(|i| uniform(7, i)).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f32>() / draws.len() as f32;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert_eq!(uniform(7, 3), draws[3]);
        assert_ne!(uniform(8, 3), draws[3]);
    }

    #[test]
    fn rng_below_covers_range_and_shuffle_permutes() {
        let mut r = Rng::new(1);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[r.below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        let mut v: Vec<usize> = (0..100).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
