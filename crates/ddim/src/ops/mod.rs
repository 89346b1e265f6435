//! Fast CPU kernels for what candle 0.11 does slowly on the CPU, as candle custom ops with
//! forward and backward passes; on other devices and dtypes they fall back to candle's own ops.

pub mod bf16;
pub mod conv;
pub mod elementwise;
mod gemm;
mod geometry;
pub mod group_norm;
pub mod simd;
pub mod winograd;

pub use conv::{conv2d, Conv2d};
pub use elementwise::{add_planes, silu, upsample_nearest_2x};
pub use group_norm::{group_norm, group_norm_silu, GroupNorm};

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout};

/// The f32 values of a contiguous CPU tensor, or an error naming `op` and `what`.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: {what} must be f32")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// A vector of `n` values that `fill` writes, without zeroing it first (a fresh output is
/// written whole by every kernel that uses this; zeroing it would be one more pass over memory).
///
/// # Safety
/// `fill` must write every one of the `n` values.
pub(crate) unsafe fn uninit_vec(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's `fill` initialised all n values.
    unsafe { v.set_len(n) };
    v
}

/// An empty vector with room for `n` values whose pages Linux backs with transparent huge
/// pages where the system allows it on request (`madvise` mode, the default of many
/// distributions): for buffers of many MiB made once, such as transformed weights, whose first
/// writes would otherwise take one page fault per 4 KiB. Elsewhere, a plain `Vec::with_capacity`.
pub(crate) fn huge_page_vec(n: usize) -> Vec<f32> {
    let v: Vec<f32> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (from, to) = (start.next_multiple_of(HUGE), (start + 4 * n) / HUGE * HUGE);
        if to > from {
            // SAFETY: [from, to) lies inside the allocation `v` owns; the advice changes how
            // its pages are backed, not their contents (none are written yet).
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// What the kernels' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// Standard normal values · `scale` + `shift` of the given shape, from `seed`.
    pub fn randn(dims: &[usize], seed: u64, scale: f32, shift: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let mut v = vec![0f32; n];
        crate::rng::ImageStream::new(seed, 0).fill_normal(&mut v);
        let v: Vec<f32> = v.into_iter().map(|x| x * scale + shift).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// Backpropagates `sum(out · w)` (w random from `seed`) through `ours` and through `theirs`
    /// (two computations of the same values) and asserts that every var's gradients agree
    /// within `tol`.
    pub fn assert_same_gradients(
        ours: &Tensor,
        theirs: &Tensor,
        vars: &[&candle_core::Var],
        seed: u64,
        tol: f32,
    ) {
        let w = randn(ours.dims(), seed, 1.0, 0.0);
        let grads = |t: &Tensor| (t * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(ours), grads(theirs));
        for v in vars {
            let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < tol, "gradient of {:?}: {d}", v.dims());
        }
    }

    /// The largest absolute difference of two tensors of one shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
