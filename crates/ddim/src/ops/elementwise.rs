//! SiLU and 2× nearest upsampling on the CPU with one-pass backward kernels.
//!
//! candle 0.11 differentiates `silu` with seven full-size tensor ops, and 2× nearest
//! upsampling with a grouped convolution that it runs as one convolution per channel; both
//! showed up in the profile of a training step.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;

const CHUNK: usize = 1 << 13;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[derive(Clone, Copy, Debug)]
struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "ddim-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "silu", "input")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = v * sigmoid(v);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &SiluBackward)?))
    }
}

/// `(x, dy) -> dy · σ(x)(1 + x(1 - σ(x)))`.
#[derive(Clone, Copy, Debug)]
struct SiluBackward;

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
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(d, (x, g))| {
                for ((o, &v), &g) in d.iter_mut().zip(x).zip(g) {
                    let s = sigmoid(v);
                    *o = g * s * (1.0 + v * (1.0 - s));
                }
            });
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
}
