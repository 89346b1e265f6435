//! SiLU, 2× nearest upsampling and per-channel additions on the CPU with one-pass backward
//! kernels.
//!
//! candle 0.11 differentiates `silu` with seven full-size tensor ops, 2× nearest upsampling with
//! a grouped convolution that it runs as one convolution per channel, and a broadcast addition
//! (a convolution's bias, the time embedding) with a strided single-threaded sum over the batch
//! and the pixels; all showed up in the profile of a training step.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::simd::multiversion;
use super::{f32_slice, uninit_vec};

const CHUNK: usize = 1 << 13;

/// `e^x` in f32 without a libm call or a branch, so that loops over it vectorize: Cody–Waite
/// reduction `x = n·ln 2 + r` (|r| ≤ ln 2 / 2, `n` rounded by the 1.5·2^23 trick) and Cephes'
/// degree-6 polynomial for `e^r` (relative error within a few ulp of libm's `expf`), scaled by
/// `2^n` built from its exponent bits. `x` is clamped to [-87, 88] (results stay normal).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // t's low mantissa bits hold n (t lies in [2^23, 2^24), where floats are the integers)
    let e = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    y * f32::from_bits(e as u32)
}

/// `1 / (1 + e^-x)` with [`exp`].
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// `y = x · σ(x)`.
    fn silu_run(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (o, &v) in y.iter_mut().zip(x) {
            o.write(v * sigmoid(v));
        }
    }
}

multiversion! {
    /// `d = g · σ(x)(1 + x(1 - σ(x)))`.
    fn silu_backward_run(x: &[f32], g: &[f32], d: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &g) in d.iter_mut().zip(x).zip(g) {
            let s = sigmoid(v);
            o.write(g * s * (1.0 + v * (1.0 - s)));
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "ddim-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "silu", "input")?;
        let fill = |y: &mut [MaybeUninit<f32>]| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| silu_run(x, y))
        };
        // SAFETY: the chunks of y and x pair up, and `silu_run` writes every value of each.
        let y = unsafe { uninit_vec(x.len(), fill) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &SiluBackward)?))
    }
}

/// `(x, dy) -> dy · σ(x)(1 + x(1 - σ(x)))`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SiluBackward;

impl CustomOp2 for SiluBackward {
    fn name(&self) -> &'static str {
        "ddim-silu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (
            f32_slice(xs, xl, "silu backward", "input")?,
            f32_slice(gs, gl, "silu backward", "input")?,
        );
        if x.len() != g.len() {
            candle_core::bail!("silu backward: shapes differ")
        }
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            dx.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(d, (x, g))| silu_backward_run(x, g, d))
        };
        // SAFETY: as in `Silu`: every chunk is written whole (x and g have dx's length).
        let dx = unsafe { uninit_vec(x.len(), fill) };
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// `x · sigmoid(x)`: the kernels above for f32 on the CPU, candle's `silu` elsewhere.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Silu)
    } else {
        x.silu()
    }
}

#[derive(Clone, Copy, Debug)]
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "ddim-upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "upsample", "input")?;
        let &[b, c, h, w] = l.dims() else {
            candle_core::bail!("upsample: expected (b, c, h, w), got {:?}", l.dims())
        };
        let mut y = vec![0f32; x.len() * 4];
        y.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(yp, xp)| {
                for (i, row) in xp.chunks(w).enumerate() {
                    let out = &mut yp[2 * i * 2 * w..(2 * i + 1) * 2 * w];
                    for (j, &v) in row.iter().enumerate() {
                        out[2 * j] = v;
                        out[2 * j + 1] = v;
                    }
                    let (top, bottom) = yp[2 * i * 2 * w..(2 * i + 2) * 2 * w].split_at_mut(2 * w);
                    bottom.copy_from_slice(top);
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&Sum2x2)?))
    }
}

/// The gradient of 2× nearest upsampling: the sum of each 2×2 block.
#[derive(Clone, Copy, Debug)]
struct Sum2x2;

impl CustomOp1 for Sum2x2 {
    fn name(&self) -> &'static str {
        "ddim-sum-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "upsample backward", "input")?;
        let &[b, c, h2, w2] = l.dims() else {
            candle_core::bail!(
                "upsample backward: expected (b, c, h, w), got {:?}",
                l.dims()
            )
        };
        let (h, w) = (h2 / 2, w2 / 2);
        let mut dx = vec![0f32; b * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(g.par_chunks(h2 * w2))
            .for_each(|(dp, gp)| {
                for i in 0..h {
                    let (r0, r1) = (&gp[2 * i * w2..][..w2], &gp[(2 * i + 1) * w2..][..w2]);
                    for j in 0..w {
                        dp[i * w + j] = r0[2 * j] + r0[2 * j + 1] + r1[2 * j] + r1[2 * j + 1];
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, w))))
    }
}

/// 2× nearest-neighbour upsampling of `(b, c, h, w)`: the kernels above for f32 on the CPU,
/// candle's `upsample_nearest2d` elsewhere.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Upsample2x)
    } else {
        x.upsample_nearest2d(2 * h, 2 * w)
    }
}

/// `x (b, c, h, w) + v`, where `v` holds one value per channel (`c` values) or per image and
/// channel (`b·c` values), broadcast over the pixels.
#[derive(Clone, Copy, Debug)]
struct AddPlanes;

/// Checks the shapes: (images, channels, pixels per plane, whether `v` has one row per image).
fn planes(x: &[usize], v_len: usize) -> Result<(usize, usize, usize, bool)> {
    let &[b, c, h, w] = x else {
        candle_core::bail!("add_planes: expected x of (b, c, h, w), got {x:?}")
    };
    if v_len == c {
        Ok((b, c, h * w, false))
    } else if v_len == b * c {
        Ok((b, c, h * w, true))
    } else {
        candle_core::bail!("add_planes: {v_len} values for x of {x:?} (need c or b·c)")
    }
}

impl CustomOp2 for AddPlanes {
    fn name(&self) -> &'static str {
        "ddim-add-planes"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, v) = (
            f32_slice(xs, xl, "add_planes", "input")?,
            f32_slice(vs, vl, "add_planes", "values")?,
        );
        let (_, c, hw, per_image) = planes(xl.dims(), v.len())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let add = v[if per_image { i } else { i % c }];
                for (o, &a) in y.iter_mut().zip(x) {
                    *o = a + add;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let per_image = v.elem_count() != dy.dim(1)?;
        let dv = dy
            .contiguous()?
            .apply_op1_no_bwd(&PlaneSums { per_image })?
            .reshape(v.shape())?;
        Ok((Some(dy.clone()), Some(dv)))
    }
}

/// The gradient of [`AddPlanes`] for `v`: the sum of each (image, channel) plane, summed over
/// the images too unless `per_image`.
#[derive(Clone, Copy, Debug)]
struct PlaneSums {
    per_image: bool,
}

impl CustomOp1 for PlaneSums {
    fn name(&self) -> &'static str {
        "ddim-plane-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "plane sums", "input")?;
        let &[b, c, h, w] = l.dims() else {
            candle_core::bail!("plane sums: expected (b, c, h, w), got {:?}", l.dims())
        };
        // f64 partial sums: a plane of a 256×256 image has 65,536 values
        let sums: Vec<f64> = g
            .par_chunks(h * w)
            .map(|p| p.iter().map(|&v| v as f64).sum())
            .collect();
        if self.per_image {
            let out = sums.iter().map(|&v| v as f32).collect();
            return Ok((CpuStorage::F32(out), Shape::from((b, c))));
        }
        let mut out = vec![0f64; c];
        for row in sums.chunks(c) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        Ok((
            CpuStorage::F32(out.into_iter().map(|v| v as f32).collect()),
            Shape::from(c),
        ))
    }
}

/// `x (b, c, h, w)` plus `v` broadcast over the pixels, where `v` holds one value per channel
/// (shape `(c,)`) or per image and channel (`(b, c)` or `(b, c, 1, 1)`): the kernels above for
/// f32 on the CPU, candle's `broadcast_add` elsewhere. The gradient has `v`'s shape.
pub fn add_planes(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && v.dtype() == DType::F32 {
        planes(x.dims(), v.elem_count())?;
        x.contiguous()?.apply_op2(&v.contiguous()?, AddPlanes)
    } else {
        let rows = if v.elem_count() == c { 1 } else { b };
        x.broadcast_add(&v.reshape((rows, c, 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn silu_and_upsample_match_candle() {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 4], 1, 4.0, 0.0)).unwrap();
        let w = randn(&[2, 3, 5, 4], 2, 4.0, 0.0);
        let (a, b) = (silu(&x).unwrap(), x.silu().unwrap());
        assert!(max_diff(&a, &b) < 1e-6);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);

        let w = randn(&[2, 3, 10, 8], 3, 4.0, 0.0);
        let (a, b) = (
            upsample_nearest_2x(&x).unwrap(),
            x.upsample_nearest2d(10, 8).unwrap(),
        );
        assert_eq!(max_diff(&a, &b), 0.0);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn add_planes_matches_broadcast_add_forward_and_backward() {
        let x = Var::from_tensor(&randn(&[3, 4, 5, 6], 4, 2.0, 0.0)).unwrap();
        let w = randn(&[3, 4, 5, 6], 5, 2.0, 0.0);
        for (shape, seed) in [(vec![4], 6), (vec![3, 4, 1, 1], 7), (vec![1, 4, 1, 1], 8)] {
            let v = Var::from_tensor(&randn(&shape, seed, 1.0, 0.5)).unwrap();
            let rows = if shape.len() == 1 { 1 } else { shape[0] };
            let a = add_planes(&x, &v).unwrap();
            let b = x
                .broadcast_add(&v.reshape((rows, 4, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&a, &b) < 1e-6, "{shape:?}");
            let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-6);
            let (da, db) = (ga.get(&v).unwrap(), gb.get(&v).unwrap());
            assert_eq!(da.dims(), shape.as_slice());
            assert!(max_diff(da, db) < 1e-4, "{shape:?}");
        }
        let bad = randn(&[5], 9, 1.0, 0.0);
        assert!(add_planes(&x, &bad).is_err());
    }

    /// The vectorisable `exp` and `sigmoid` agree with libm to a few ulp where results are
    /// normal, saturate outside, and keep NaN.
    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan() && sigmoid(f32::NAN).is_nan());
        for v in [-100f32, -20.0, -1.0, 0.0, 0.5, 3.0, 20.0, 100.0] {
            let libm = 1.0 / (1.0 + (-v).exp());
            assert!(
                (sigmoid(v) - libm).abs() <= 5e-7 * libm + 1e-37,
                "{v}: {} vs {libm}",
                sigmoid(v)
            );
        }
    }
}
