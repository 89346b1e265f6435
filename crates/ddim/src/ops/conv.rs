//! 2-d convolution on the CPU as matrix products (im2col + GEMM), forward and backward.
//!
//! candle 0.11's CPU `conv2d` copies its input into a new layout on every call and computes the
//! input gradient with a direct `conv_transpose2d` loop, which dominates a training step (a
//! profile of `ddim train` on the `small` preset spent more time in that loop than in every
//! GEMM together). Here all three products are GEMMs of the `gemm` crate (candle's own matmul
//! kernel):
//! - forward: `y_b = W · col(x_b)`, `W` as `(c_out, c_in·kh·kw)`;
//! - input gradient: `dx_b = col⁻¹(Wᵀ · dy_b)` (col2im adds overlapping windows);
//! - weight gradient: `dW = Σ_b dy_b · col(x_b)ᵀ`.
//!
//! 1×1 convolutions with stride 1 and no padding skip im2col (`col(x_b) = x_b`). Batches are
//! split across threads image by image; a single image lets GEMM use the threads instead.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};

use super::f32_slice;
use rayon::prelude::*;

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[b, c_in, h, wd], &[c_out, c_in_w, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected (b, c, h, w) input and (o, c, kh, kw) weight, got {x:?} and {w:?}")
        };
        if c_in != c_in_w {
            candle_core::bail!("conv2d: input has {c_in} channels, weight expects {c_in_w}")
        }
        if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} (stride {stride}, padding {padding}) does not fit input {h}x{wd}")
        }
        Ok(Geometry {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            stride,
            padding,
            ho: (h + 2 * padding - kh) / stride + 1,
            wo: (wd + 2 * padding - kw) / stride + 1,
        })
    }

    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn n(&self) -> usize {
        self.ho * self.wo
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// (threads to split the batch over, GEMM parallelism inside each).
    fn split(&self) -> (usize, Parallelism) {
        let threads = rayon::current_num_threads().max(1);
        if self.b >= threads {
            (threads, Parallelism::None)
        } else {
            (1, Parallelism::Rayon(threads))
        }
    }

    /// Writes `col(x)` (`k × n`, row-major) for one image `x` (`c_in × h × w`).
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (n, s, p) = (self.n(), self.stride, self.padding as isize);
        for c in 0..self.c_in {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((c * self.kh + i) * self.kw + j) * n..][..n];
                    for oy in 0..self.ho {
                        let iy = (oy * s) as isize - p + i as isize;
                        let out = &mut row[oy * self.wo..(oy + 1) * self.wo];
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        if s == 1 {
                            // ix = ox - p + j: one contiguous run of the source row
                            let shift = j as isize - p;
                            let lo = (-shift).clamp(0, self.wo as isize) as usize;
                            let hi = (self.w as isize - shift).clamp(lo as isize, self.wo as isize)
                                as usize;
                            out[..lo].fill(0.0);
                            out[lo..hi].copy_from_slice(
                                &src[(lo as isize + shift) as usize
                                    ..(hi as isize + shift) as usize],
                            );
                            out[hi..].fill(0.0);
                            continue;
                        }
                        for (ox, o) in out.iter_mut().enumerate() {
                            let ix = (ox * s) as isize - p + j as isize;
                            *o = if ix >= 0 && ix < self.w as isize {
                                src[ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }

    /// Adds the windows of `col` (`k × n`) back into one image gradient `dx` (`c_in × h × w`).
    fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        let (n, s, p) = (self.n(), self.stride, self.padding as isize);
        for c in 0..self.c_in {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &col[((c * self.kh + i) * self.kw + j) * n..][..n];
                    for oy in 0..self.ho {
                        let iy = (oy * s) as isize - p + i as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        let src = &row[oy * self.wo..(oy + 1) * self.wo];
                        if s == 1 {
                            let shift = j as isize - p;
                            let lo = (-shift).clamp(0, self.wo as isize) as usize;
                            let hi = (self.w as isize - shift).clamp(lo as isize, self.wo as isize)
                                as usize;
                            let d = &mut dst
                                [(lo as isize + shift) as usize..(hi as isize + shift) as usize];
                            for (o, &v) in d.iter_mut().zip(&src[lo..hi]) {
                                *o += v;
                            }
                            continue;
                        }
                        for (ox, &v) in row[oy * self.wo..(oy + 1) * self.wo].iter().enumerate() {
                            let ix = (ox * s) as isize - p + j as isize;
                            if ix >= 0 && ix < self.w as isize {
                                dst[ix as usize] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst (m×n) = [dst +] a (m×k, strides ars/acs) · b (k×n, strides brs/bcs)`, row-major `dst`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    debug_assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the slices hold every element the strides address (checked above in debug
    // builds; every caller derives m, n, k and the strides from the same geometry as the
    // slice lengths), and `dst` does not alias `a` or `b`.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Splits `data` into `parts` runs of whole images of `per` values each.
fn image_chunks(b: usize, parts: usize) -> usize {
    b.div_ceil(parts.max(1)).max(1)
}

/// The forward convolution: `(x, w) -> y`.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOp {
    /// Stride of both axes.
    pub stride: usize,
    /// Zero padding of all four sides.
    pub padding: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ddim-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        let (x, w) = (
            f32_slice(xs, xl, "conv2d", "input")?,
            f32_slice(ws, wl, "conv2d", "weight")?,
        );
        let (k, n, per_in) = (g.k(), g.n(), g.c_in * g.h * g.w);
        let per_out = g.c_out * n;
        let mut y = vec![0f32; g.b * per_out];
        let (parts, par) = g.split();
        let chunk = image_chunks(g.b, parts);
        y.par_chunks_mut(chunk * per_out)
            .zip(x.par_chunks(chunk * per_in))
            .for_each(|(ys, xs)| {
                let mut col = if g.is_pointwise() {
                    Vec::new()
                } else {
                    vec![0f32; k * n]
                };
                for (yb, xb) in ys.chunks_mut(per_out).zip(xs.chunks(per_in)) {
                    let col = if g.is_pointwise() {
                        xb
                    } else {
                        g.im2col(xb, &mut col);
                        &col[..]
                    };
                    matmul(g.c_out, n, k, yb, false, w, (k, 1), col, (n, 1), par);
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.c_out, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(
            w,
            &Conv2dInputGrad {
                stride: self.stride,
                padding: self.padding,
                input: (x.dim(2)?, x.dim(3)?),
            },
        )?;
        let dw = x.apply_op2_no_bwd(
            &dy,
            &Conv2dWeightGrad {
                stride: self.stride,
                padding: self.padding,
                kernel: (w.dim(2)?, w.dim(3)?),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(dy, w) -> dx` for an input of `input` = (h, w).
#[derive(Clone, Copy, Debug)]
struct Conv2dInputGrad {
    stride: usize,
    padding: usize,
    input: (usize, usize),
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "ddim-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dyd, wd) = (dyl.dims(), wl.dims());
        let x_dims = [dyd[0], wd[1], self.input.0, self.input.1];
        let g = Geometry::new(&x_dims, wd, self.stride, self.padding)?;
        if dyd != [g.b, g.c_out, g.ho, g.wo] {
            candle_core::bail!("conv2d backward: gradient shape {dyd:?} does not match")
        }
        let (dy, w) = (
            f32_slice(dys, dyl, "conv2d", "gradient")?,
            f32_slice(ws, wl, "conv2d", "weight")?,
        );
        let (k, n, per_in) = (g.k(), g.n(), g.c_in * g.h * g.w);
        let per_out = g.c_out * n;
        let mut dx = vec![0f32; g.b * per_in];
        let (parts, par) = g.split();
        let chunk = image_chunks(g.b, parts);
        dx.par_chunks_mut(chunk * per_in)
            .zip(dy.par_chunks(chunk * per_out))
            .for_each(|(dxs, dys)| {
                let mut col = if g.is_pointwise() {
                    Vec::new()
                } else {
                    vec![0f32; k * n]
                };
                for (dxb, dyb) in dxs.chunks_mut(per_in).zip(dys.chunks(per_out)) {
                    // Wᵀ (k × c_out) · dy_b (c_out × n)
                    if g.is_pointwise() {
                        matmul(k, n, g.c_out, dxb, false, w, (1, k), dyb, (n, 1), par);
                    } else {
                        matmul(k, n, g.c_out, &mut col, false, w, (1, k), dyb, (n, 1), par);
                        g.col2im(&col, dxb);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from(x_dims.to_vec())))
    }
}

/// `(x, dy) -> dw` for a kernel of `kernel` = (kh, kw).
#[derive(Clone, Copy, Debug)]
struct Conv2dWeightGrad {
    stride: usize,
    padding: usize,
    kernel: (usize, usize),
}

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "ddim-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xd, dyd) = (xl.dims(), dyl.dims());
        let w_dims = [dyd[1], xd[1], self.kernel.0, self.kernel.1];
        let g = Geometry::new(xd, &w_dims, self.stride, self.padding)?;
        if dyd != [g.b, g.c_out, g.ho, g.wo] {
            candle_core::bail!("conv2d backward: gradient shape {dyd:?} does not match")
        }
        let (x, dy) = (
            f32_slice(xs, xl, "conv2d", "input")?,
            f32_slice(dys, dyl, "conv2d", "gradient")?,
        );
        let (k, n, per_in) = (g.k(), g.n(), g.c_in * g.h * g.w);
        let per_out = g.c_out * n;
        let (parts, par) = g.split();
        let chunk = image_chunks(g.b, parts);
        // One partial dW per thread, summed at the end (fixed order: deterministic).
        let partials: Vec<Vec<f32>> = x
            .par_chunks(chunk * per_in)
            .zip(dy.par_chunks(chunk * per_out))
            .map(|(xs, dys)| {
                let mut dw = vec![0f32; g.c_out * k];
                let mut col = if g.is_pointwise() {
                    Vec::new()
                } else {
                    vec![0f32; k * n]
                };
                for (i, (xb, dyb)) in xs.chunks(per_in).zip(dys.chunks(per_out)).enumerate() {
                    let col = if g.is_pointwise() {
                        xb
                    } else {
                        g.im2col(xb, &mut col);
                        &col[..]
                    };
                    // dy_b (c_out × n) · col_bᵀ (n × k)
                    matmul(g.c_out, k, n, &mut dw, i > 0, dyb, (n, 1), col, (1, n), par);
                }
                dw
            })
            .collect();
        let mut parts = partials.into_iter();
        let mut dw = parts.next().unwrap_or_else(|| vec![0f32; g.c_out * k]);
        for p in parts {
            for (a, b) in dw.iter_mut().zip(&p) {
                *a += b;
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from(w_dims.to_vec())))
    }
}

/// `conv2d(x, w)` with square `stride` and `padding`: the GEMM kernels above for contiguous
/// f32 tensors on the CPU, candle's own `conv2d` everywhere else (CUDA, Metal, other dtypes).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == x.dtype() {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, Conv2dOp { stride, padding })
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// A `nn.Conv2d` with square kernel, stride and padding (weights `weight` `(o, c, k, k)` and
/// `bias` `(o,)`), running [`conv2d`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Reads `weight` and `bias` from `vb` (initialised as candle_nn's `conv2d` would when `vb`
    /// creates variables).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (c_out, c_in, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1.0 / ((c_in * kernel * kernel) as f64).sqrt();
        let bias = vb.get_with_hints(
            c_out,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Conv2d {
            weight,
            bias: Some(bias),
            stride,
            padding,
        })
    }

    /// The weight, `(o, c, k, k)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => super::add_planes(&y, b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::Var;

    /// Forward and both gradients equal candle's conv2d (and its autograd) for the shapes a
    /// UNet uses: 3×3 stride 1 pad 1, 3×3 stride 2 pad 1 / pad 0, 1×1, odd sizes, batch 1 and 5.
    #[test]
    fn matches_candle_forward_and_backward() {
        let cases = [
            (5, 3, 8, 8, 4, 3, 1, 1),
            (1, 4, 7, 9, 6, 3, 1, 1),
            (5, 4, 8, 8, 4, 3, 2, 1),
            (2, 4, 9, 9, 4, 3, 2, 0),
            (3, 6, 5, 5, 8, 1, 1, 0),
            (2, 2, 6, 6, 3, 3, 1, 0),
        ];
        for (seed, &(b, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
            let x = Var::from_tensor(&randn(&[b, c, h, w], seed as u64, 1.0, 0.0)).unwrap();
            let wt = Var::from_tensor(&randn(&[o, c, k, k], 100 + seed as u64, 1.0, 0.0)).unwrap();
            let ours = conv2d(&x, &wt, s, p).unwrap();
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let scale = randn(ours.dims(), 200 + seed as u64, 1.0, 0.0);
            let tol = 1e-4;
            assert!(max_diff(&ours, &theirs) < tol, "forward {:?}", cases[seed]);
            let g1 = (ours * &scale)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &scale)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(
                    max_diff(a, b) < tol,
                    "gradient {:?}: {}",
                    cases[seed],
                    max_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = randn(&[1, 3, 4, 4], 0, 1.0, 0.0);
        assert!(conv2d(&x, &randn(&[2, 4, 3, 3], 1, 1.0, 0.0), 1, 1).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 7, 7], 1, 1.0, 0.0), 1, 1).is_err());
    }
}
