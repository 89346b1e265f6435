//! Run-time selection of wider vector instructions for our own kernels.
//!
//! The crate is compiled for the architecture's baseline (SSE2 on x86-64), so that one binary
//! runs on any x86-64 CPU; the `gemm` crate picks AVX2/AVX-512 kernels at run time, but our
//! own loops stay 4 floats wide. [`multiversion!`] compiles a kernel twice, once with AVX2
//! enabled, and calls that copy when the CPU has AVX2. It is used where it was measured to
//! help: GroupNorm + SiLU and SiLU, whose `exp` is arithmetic-bound (half the time at batch
//! 16). The Winograd transforms are memory-bound, and their AVX2 copies measured slower than
//! the SSE2 ones on the 2-core AMD EPYC test machine (F(4×4) at 16×128×32×32: 28.0 against
//! 22.2 ms), so they stay at the baseline.
//!
//! Both copies compute the same values bit for bit: Rust never contracts `a * b + c` into a
//! fused multiply-add or reorders floating-point sums, so the wider copy runs the same IEEE
//! operations in the same order (a test checks this on every kernel that uses it).
//!
//! `DDIM_SIMD=portable` in the environment (read once) or [`force_portable`] selects the
//! baseline copies, for comparisons.

use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const WIDE: u8 = 1;
const PORTABLE: u8 = 2;

static LEVEL: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the AVX2 copies run: the CPU has AVX2, and neither `DDIM_SIMD=portable` nor
/// [`force_portable`] said otherwise.
#[inline]
pub fn wide() -> bool {
    match LEVEL.load(Ordering::Relaxed) {
        WIDE => true,
        PORTABLE => false,
        _ => detect(),
    }
}

#[cold]
fn detect() -> bool {
    let off = std::env::var("DDIM_SIMD").is_ok_and(|v| v.eq_ignore_ascii_case("portable"));
    let wide = !off && cpu_has_avx2();
    LEVEL.store(if wide { WIDE } else { PORTABLE }, Ordering::Relaxed);
    wide
}

fn cpu_has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Makes the kernels run their baseline copies (`true`) or go back to detecting the CPU
/// (`false`). Both give the same values; this is for benchmarks and tests.
pub fn force_portable(portable: bool) {
    LEVEL.store(if portable { PORTABLE } else { UNKNOWN }, Ordering::Relaxed);
}

/// Defines a function whose body is compiled twice, for the baseline and with AVX2 enabled,
/// and that runs the AVX2 copy when [`wide`] says so. The body's loops are what benefits:
/// helpers it calls must be `#[inline(always)]` to be compiled into the AVX2 copy.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            if $crate::ops::simd::wide() {
                // SAFETY: `wide()` is true only where the CPU has AVX2.
                return unsafe { avx2($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::randn;
    use candle_core::Tensor;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The kernels built with [`multiversion!`] give the same bits in both copies. The only
    /// test that switches copies (the switch is process-wide; other tests see equal values
    /// either way).
    #[test]
    fn both_copies_give_the_same_bits() {
        // 5×7 planes: runs that are not a multiple of any vector width
        let x = randn(&[2, 8, 5, 7], 11, 3.0, 0.5);
        let g = randn(&[2, 8, 5, 7], 12, 1.0, 0.0);
        let (gamma, beta) = (randn(&[8], 13, 1.0, 1.0), randn(&[8], 14, 1.0, 0.0));
        let run = || {
            let silu = crate::ops::silu(&x).unwrap();
            let gn = crate::ops::group_norm_silu(&x, &gamma, &beta, 4, 1e-5).unwrap();
            let var = candle_core::Var::from_tensor(&x).unwrap();
            let y = crate::ops::silu(var.as_tensor()).unwrap();
            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(var.as_tensor()).unwrap().clone();
            [silu, gn, dx].map(|t| values(&t))
        };
        force_portable(true);
        assert!(!wide());
        let portable = run();
        force_portable(false);
        if !wide() {
            eprintln!("no AVX2 on this CPU (or DDIM_SIMD=portable): one copy runs");
        }
        let detected = run();
        for (a, b) in portable.iter().zip(&detected) {
            let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "the two copies differ");
        }
    }
}
