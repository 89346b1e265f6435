//! GroupNorm on the CPU in two passes over the data, forward and backward.
//!
//! candle_nn's `GroupNorm` is a chain of ten tensor ops (mean, subtract, square, mean, add,
//! sqrt, divide, multiply, add, and reshapes); each allocates a full-size tensor, and autograd
//! adds as many again for the backward pass. Here the forward pass is one statistics pass plus
//! one normalising pass per (image, group), and the backward pass recomputes the statistics and
//! produces the input, scale and shift gradients together.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::elementwise::{sigmoid, SiluBackward};
use std::mem::MaybeUninit;

use super::simd::multiversion;
use super::{f32_slice, uninit_vec};

#[derive(Clone, Copy, Debug)]
struct Dims {
    c: usize,
    hw: usize,
    groups: usize,
}

impl Dims {
    fn new(x: &[usize], groups: usize) -> Result<Self> {
        if x.len() < 2 {
            candle_core::bail!("group_norm: expected (b, c, ...) input, got {x:?}")
        }
        let c = x[1];
        if groups == 0 || !c.is_multiple_of(groups) {
            candle_core::bail!("group_norm: {c} channels cannot form {groups} groups")
        }
        Ok(Dims {
            c,
            hw: x[2..].iter().product(),
            groups,
        })
    }

    /// Values per (image, group).
    fn group_len(&self) -> usize {
        self.c / self.groups * self.hw
    }
}

/// `Σ f(x_i)` in f64 with eight independent accumulators, so that the loop vectorises (one
/// accumulator is a chain of dependent additions, four cycles each).
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(f64::from(v));
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// Mean and 1/sqrt(var + eps) of one group, accumulated in f64 (two passes).
#[inline(always)]
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = sum_f64(x, |v| v) / n;
    let var = sum_f64(x, |v| (v - mean) * (v - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

multiversion! {
    /// One (image, group) of `cpg` channels of `hw` values: `yg = (xg - mean) · rstd · γ + β`
    /// per channel, through SiLU when `silu`.
    fn normalize_group(
        xg: &[f32],
        yg: &mut [MaybeUninit<f32>],
        hw: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        silu: bool,
    ) {
        let (mean, rstd) = stats(xg, eps);
        for ((yc, xc), (&g, &b)) in yg.chunks_mut(hw).zip(xg.chunks(hw)).zip(gamma.iter().zip(beta)) {
            let scale = rstd * g;
            let shift = b - mean * scale;
            if silu {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    let z = v * scale + shift;
                    o.write(z * sigmoid(z));
                }
            } else {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    o.write(v * scale + shift);
                }
            }
        }
    }
}

/// `group_norm(x, gamma, beta)`, followed by SiLU when `silu`: the forward op.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormOp {
    /// Number of groups.
    pub groups: usize,
    /// ε added to the variance.
    pub eps: f64,
    /// Apply SiLU to the result in the same pass.
    pub silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ddim-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(xl.dims(), self.groups)?;
        let (x, gamma, beta) = (
            f32_slice(xs, xl, "group_norm", "input")?,
            f32_slice(gs, gl, "group_norm", "weight")?,
            f32_slice(bs, bl, "group_norm", "bias")?,
        );
        if gamma.len() != d.c || beta.len() != d.c {
            candle_core::bail!("group_norm: weight and bias must have {} values", d.c)
        }
        let cpg = d.c / d.groups;
        let fill = |y: &mut [MaybeUninit<f32>]| {
            y.par_chunks_mut(d.group_len())
                .zip(x.par_chunks(d.group_len()))
                .enumerate()
                .for_each(|(bg, (yg, xg))| {
                    let c0 = (bg % d.groups) * cpg;
                    let (gamma, beta) = (&gamma[c0..c0 + cpg], &beta[c0..c0 + cpg]);
                    normalize_group(xg, yg, d.hw, gamma, beta, self.eps, self.silu);
                })
        };
        // SAFETY: the groups cover the output, and `normalize_group` writes all of each.
        let y = unsafe { uninit_vec(x.len(), fill) };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut dy = dy.contiguous()?;
        if self.silu {
            // through the SiLU first, at the recomputed normalised values
            let plain = GroupNormOp {
                silu: false,
                ..*self
            };
            let z = x.apply_op3_no_bwd(gamma, beta, &plain)?;
            dy = z.apply_op2_no_bwd(&dy, &SiluBackward)?;
        }
        let c = x.dim(1)?;
        let n = x.elem_count();
        let all = x.apply_op3_no_bwd(gamma, &dy, &GroupNormBackward(*self))?;
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = all.narrow(0, n, c)?;
        let dbeta = all.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, gamma, dy) -> [dx, dgamma, dbeta]` flattened into one vector.
#[derive(Clone, Copy, Debug)]
struct GroupNormBackward(GroupNormOp);

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "ddim-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(xl.dims(), self.0.groups)?;
        let (x, gamma, dy) = (
            f32_slice(xs, xl, "group_norm", "input")?,
            f32_slice(gs, gl, "group_norm", "weight")?,
            f32_slice(dys, dyl, "group_norm", "gradient")?,
        );
        if dy.len() != x.len() || gamma.len() != d.c {
            candle_core::bail!("group_norm backward: shapes do not match")
        }
        let cpg = d.c / d.groups;
        // dx, with room for dgamma and dbeta after it (growing it later copied all of dx: 0.9%
        // of a training step)
        let mut dx = Vec::with_capacity(x.len() + 2 * d.c);
        dx.resize(x.len(), 0f32);
        // Per (image, group): the per-channel sums of dy and dy·x̂, for dgamma and dbeta.
        let sums: Vec<Vec<(f64, f64)>> = dx
            .par_chunks_mut(d.group_len())
            .zip(
                x.par_chunks(d.group_len())
                    .zip(dy.par_chunks(d.group_len())),
            )
            .enumerate()
            .map(|(bg, (dxg, (xg, dyg)))| {
                let (mean, rstd) = stats(xg, self.0.eps);
                let c0 = (bg % d.groups) * cpg;
                let mut per_channel = Vec::with_capacity(cpg);
                // mean over the group of g = dy·γ and of g·x̂
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                for (ci, (xc, dyc)) in xg.chunks(d.hw).zip(dyg.chunks(d.hw)).enumerate() {
                    let gm = gamma[c0 + ci];
                    let (mut s_dy, mut s_dyx) = (0f64, 0f64);
                    for (&v, &g) in xc.iter().zip(dyc) {
                        let xhat = f64::from((v - mean) * rstd);
                        s_dy += f64::from(g);
                        s_dyx += f64::from(g) * xhat;
                    }
                    sum_g += s_dy * f64::from(gm);
                    sum_gx += s_dyx * f64::from(gm);
                    per_channel.push((s_dy, s_dyx));
                }
                let n = xg.len().max(1) as f64;
                let (mg, mgx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
                for (ci, ((dxc, xc), dyc)) in dxg
                    .chunks_mut(d.hw)
                    .zip(xg.chunks(d.hw))
                    .zip(dyg.chunks(d.hw))
                    .enumerate()
                {
                    let gm = gamma[c0 + ci];
                    for ((o, &v), &g) in dxc.iter_mut().zip(xc).zip(dyc) {
                        let xhat = (v - mean) * rstd;
                        *o = rstd * (g * gm - mg - xhat * mgx);
                    }
                }
                per_channel
            })
            .collect();
        let mut out = dx;
        let (mut dgamma, mut dbeta) = (vec![0f64; d.c], vec![0f64; d.c]);
        for (bg, per_channel) in sums.iter().enumerate() {
            let c0 = (bg % d.groups) * cpg;
            for (ci, &(s_dy, s_dyx)) in per_channel.iter().enumerate() {
                dbeta[c0 + ci] += s_dy;
                dgamma[c0 + ci] += s_dyx;
            }
        }
        out.extend(dgamma.iter().map(|&v| v as f32));
        out.extend(dbeta.iter().map(|&v| v as f32));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `GroupNorm(groups, c, eps)` applied to `x` `(b, c, ...)` with per-channel `gamma`, `beta`:
/// the kernels above for f32 on the CPU, candle_nn's composition of tensor ops elsewhere.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    group_norm_act(x, gamma, beta, groups, eps, false)
}

/// `silu(group_norm(x, gamma, beta))` in one pass on the CPU (the pair every UNet resnet
/// starts with); candle's ops elsewhere.
pub fn group_norm_silu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    group_norm_act(x, gamma, beta, groups, eps, true)
}

fn group_norm_act(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && gamma.dtype() == x.dtype() {
        x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            GroupNormOp { groups, eps, silu },
        )
    } else {
        let c = x.dim(1)?;
        let m = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, eps)?;
        let y = candle_core::Module::forward(&m, x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// A `nn.GroupNorm` (weights `weight`, `bias`) running [`group_norm`].
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Reads `weight` (ones) and `bias` (zeros) of `channels` values from `vb`.
    pub fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels cannot form {groups} groups")
        }
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            groups,
            eps,
        })
    }
}

impl GroupNorm {
    /// `silu(self.forward(x))`, fused on the CPU ([`group_norm_silu`]).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_silu(x, &self.weight, &self.bias, self.groups, self.eps)
    }
}

impl candle_core::Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, &self.weight, &self.bias, self.groups, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_same_gradients, max_diff, randn};
    use candle_core::{Device, Var};

    /// Ours (GroupNorm, then SiLU when `silu`, fused) against candle_nn's GroupNorm (then
    /// candle's silu) and its autograd: forward and all three gradients, at odd and even
    /// sizes, one group and one channel per group.
    fn check_against_candle(silu: bool) {
        for (seed, &(b, c, h, w, g)) in [
            (2, 8, 5, 5, 4),
            (3, 6, 4, 3, 3),
            (1, 4, 7, 7, 1),
            (2, 4, 2, 2, 4),
        ]
        .iter()
        .enumerate()
        {
            let s = seed as u64;
            let x = Var::from_tensor(&randn(&[b, c, h, w], s, 3.0, 1.5)).unwrap();
            let gamma = Var::from_tensor(&randn(&[c], s + 10, 1.0, 1.0)).unwrap();
            let beta = Var::from_tensor(&randn(&[c], s + 20, 1.0, 0.0)).unwrap();
            let m = candle_nn::GroupNorm::new(
                gamma.as_tensor().clone(),
                beta.as_tensor().clone(),
                c,
                g,
                1e-5,
            )
            .unwrap();
            let theirs = candle_core::Module::forward(&m, x.as_tensor()).unwrap();
            let (ours, theirs) = if silu {
                let ours = group_norm_silu(&x, &gamma, &beta, g, 1e-5).unwrap();
                (ours, theirs.silu().unwrap())
            } else {
                (group_norm(&x, &gamma, &beta, g, 1e-5).unwrap(), theirs)
            };
            let d = max_diff(&ours, &theirs);
            assert!(
                d < 1e-5,
                "silu {silu}, {b}x{c}x{h}x{w} in {g} groups: forward {d}"
            );
            assert_same_gradients(&ours, &theirs, &[&x, &gamma, &beta], s + 30, 1e-4);
        }
    }

    #[test]
    fn matches_candle_nn() {
        check_against_candle(false);
    }

    #[test]
    fn fused_silu_matches_candle() {
        check_against_candle(true);
    }

    #[test]
    fn bad_groups_are_errors() {
        let x = randn(&[1, 6, 2, 2], 0, 1.0, 0.0);
        let ones = Tensor::ones(6, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(group_norm(&x, &ones, &ones, 4, 1e-5).is_err());
        assert!(group_norm(&x, &ones, &ones, 0, 1e-5).is_err());
    }
}
