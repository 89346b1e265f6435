//! Fast CPU kernels for what candle 0.11 does slowly on the CPU, as candle custom ops with
//! forward and backward passes; on other devices and dtypes they fall back to candle's own ops.

pub mod conv;
pub mod elementwise;
pub mod group_norm;
pub mod winograd;

pub use conv::{conv2d, Conv2d};
pub use elementwise::{add_planes, silu, upsample_nearest_2x};
pub use group_norm::{group_norm, group_norm_silu, GroupNorm};

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
