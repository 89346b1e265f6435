//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2015,
//! arXiv:1509.09308) on the CPU, for inference.
//!
//! Each 2×2 block of outputs comes from a 4×4 block of inputs: with the weights transformed
//! once to `U = G g Gᵀ` (16 matrices of `c_out × c_in`) and each input block to `V = Bᵀ d B`,
//! the 16 element-wise products over channels are 16 GEMMs `M_ξ = U_ξ · V_ξ`, and
//! `y = Aᵀ M A` gives the outputs. That is 16 multiply-adds per 4 outputs per channel pair
//! where im2col + GEMM needs 36: 2.25 times fewer FLOPs, and 16/9 less scratch memory.
//! The blocks are cut into chunks of [`CHUNK_FLOATS`] scratch values, spread over threads like
//! the tiles of [`super::conv`]. F(2×2, 3×3) loses almost nothing in f32 (its transforms hold
//! only 0, ±1 and ±½); the parity tests compare it with the direct convolution.
//!
//! Used by [`super::Conv2d`] when its weight is not a training variable (the transformed
//! weight is computed once and kept); gradients flow to the input through the im2col kernels.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{matmul, with_buffer, Geometry as ConvGeometry, Out, BLOCK, COLUMNS};
use super::f32_slice;

/// Scratch values per chunk of blocks (input and product transforms together): 4 MiB, as
/// [`super::conv`]'s column tiles. Unit tests use a tiny one to cut images into many chunks.
const CHUNK_FLOATS: usize = if cfg!(test) { 1 << 10 } else { 1 << 20 };

/// The fewest 2×2 blocks a chunk gets when the image has them: one full micro-kernel height of
/// the `gemm` crate's f32 AVX kernels.
const MIN_GEMM_ROWS: usize = 16;

/// Below this many 2×2 output blocks per thread, the 16 GEMMs are too thin and im2col wins.
pub(crate) const MIN_BLOCKS_PER_THREAD: usize = 8;

/// `U = G g Gᵀ` of a `(c_out, c_in, 3, 3)` weight, as 16 row-major `c_out × c_in` matrices.
pub fn transform_weight(w: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("winograd: needs a 3x3 kernel, got {kh}x{kw}")
    }
    let g = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Tensor::from_vec(
        transform_weight_values(&g, c_out, c_in),
        (16, c_out, c_in),
        w.device(),
    )
}

/// [`transform_weight`] on the values of a `(c_out, c_in, 3, 3)` weight.
pub(crate) fn transform_weight_values(g: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let pairs = c_out * c_in;
    assert_eq!(
        g.len(),
        9 * pairs,
        "winograd: weight is not {c_out}x{c_in}x3x3"
    );
    let mut u = vec![0f32; 16 * pairs];
    for (pair, k) in g.chunks_exact(9).enumerate() {
        // t = G g (4 × 3), then U = t Gᵀ (4 × 4); G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]
        let row = |r: usize| [k[r * 3], k[r * 3 + 1], k[r * 3 + 2]];
        let (g0, g1, g2) = (row(0), row(1), row(2));
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            t[0][j] = g0[j];
            t[1][j] = 0.5 * (g0[j] + g1[j] + g2[j]);
            t[2][j] = 0.5 * (g0[j] - g1[j] + g2[j]);
            t[3][j] = g2[j];
        }
        for (i, [a, b, c]) in t.into_iter().enumerate() {
            let vals = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            for (j, v) in vals.into_iter().enumerate() {
                u[(i * 4 + j) * pairs + pair] = v;
            }
        }
    }
    u
}

/// The geometry of one Winograd convolution: a 3×3, stride-1 [`ConvGeometry`] and its
/// 2×2 output blocks.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    conv: ConvGeometry,
    /// 2×2 output blocks per column and per row.
    th: usize,
    tw: usize,
}

impl std::ops::Deref for Geometry {
    type Target = ConvGeometry;

    fn deref(&self) -> &ConvGeometry {
        &self.conv
    }
}

impl Geometry {
    fn new(conv: &ConvGeometry) -> Result<Self> {
        if (conv.kh, conv.kw, conv.stride) != (3, 3, 1) {
            candle_core::bail!(
                "winograd: needs a 3x3 kernel with stride 1, got {}x{} stride {}",
                conv.kh,
                conv.kw,
                conv.stride
            )
        }
        Ok(Geometry {
            conv: *conv,
            th: conv.ho.div_ceil(2),
            tw: conv.wo.div_ceil(2),
        })
    }

    /// `V = Bᵀ d B` of the blocks of block rows `rows` (of the whole batch, `th` per image)
    /// for every input channel: value ξ of block `p` (counted from the chunk's first) of
    /// channel `c` at `v[(ξ · c_in + c) · len + p]`, `len` the chunk's block count.
    ///
    /// Row by row of blocks, so that every step is a contiguous run the compiler vectorises:
    /// the four input rows (zero-padded), `Bᵀ` across them, the results split into even and
    /// odd columns, then `B` across columns as shifted runs of those.
    fn transform_input(&self, x: &[f32], rows: Range<usize>, v: &mut [f32]) {
        let (tw, plane, pad) = (self.tw, self.h * self.w, self.padding);
        let len = rows.len() * tw;
        let stride = self.c_in * len;
        let width = 2 * tw + 2;
        let mut d = vec![0f32; 4 * width];
        let mut t = vec![0f32; 4 * width];
        let (mut even, mut odd) = (vec![0f32; 4 * (tw + 1)], vec![0f32; 4 * (tw + 1)]);
        for c in 0..self.c_in {
            for (slot, row) in rows.clone().enumerate() {
                let (image, ty) = (row / self.th, row % self.th);
                let src = &x[(image * self.c_in + c) * plane..][..plane];
                // the 4 input rows of this block row, columns shifted by the padding
                for (i, dr) in d.chunks_exact_mut(width).enumerate() {
                    dr.fill(0.0);
                    let yy = (2 * ty + i) as isize - pad as isize;
                    if yy < 0 || yy >= self.h as isize {
                        continue;
                    }
                    let line = &src[yy as usize * self.w..][..self.w];
                    let n = self.w.min(width - pad);
                    dr[pad..pad + n].copy_from_slice(&line[..n]);
                }
                let (d0, rest) = d.split_at(width);
                let (d1, rest) = rest.split_at(width);
                let (d2, d3) = rest.split_at(width);
                let (t0, rest) = t.split_at_mut(width);
                let (t1, rest) = rest.split_at_mut(width);
                let (t2, t3) = rest.split_at_mut(width);
                for k in 0..width {
                    t0[k] = d0[k] - d2[k];
                    t1[k] = d1[k] + d2[k];
                    t2[k] = d2[k] - d1[k];
                    t3[k] = d1[k] - d3[k];
                }
                for i in 0..4 {
                    let tr = &t[i * width..][..width];
                    let (e, o) = (
                        &mut even[i * (tw + 1)..][..tw + 1],
                        &mut odd[i * (tw + 1)..][..tw + 1],
                    );
                    for k in 0..=tw {
                        e[k] = tr[2 * k];
                        o[k] = tr[2 * k + 1];
                    }
                }
                let at = c * len + slot * tw;
                for i in 0..4 {
                    let e = &even[i * (tw + 1)..][..tw + 1];
                    let o = &odd[i * (tw + 1)..][..tw + 1];
                    // columns 2p..2p+4 of row i: e[p], o[p], e[p+1], o[p+1]
                    let (v0, rest) = v[(i * 4) * stride + at..].split_at_mut(stride);
                    let (v1, rest) = rest.split_at_mut(stride);
                    let (v2, v3) = rest.split_at_mut(stride);
                    for p in 0..tw {
                        v0[p] = e[p] - e[p + 1];
                        v1[p] = o[p] + e[p + 1];
                        v2[p] = e[p + 1] - o[p];
                        v3[p] = o[p] - o[p + 1];
                    }
                }
            }
        }
    }

    /// `y = Aᵀ M A` of the blocks of block rows `rows` from the products `m` (value ξ of block
    /// `p` of output channel `o` at `m[(ξ · c_out + o) · len + p]`), written into the output.
    ///
    /// # Safety
    /// `y` must be the `(b, c_out, ho, wo)` output, and no other thread may write these rows.
    unsafe fn transform_output(&self, m: &[f32], rows: Range<usize>, y: Out) {
        let (tw, plane) = (self.tw, self.ho * self.wo);
        let len = rows.len() * tw;
        let stride = self.c_out * len;
        let mut s = vec![0f32; 8 * tw];
        let mut line = vec![0f32; 2 * tw];
        for o in 0..self.c_out {
            for (slot, row) in rows.clone().enumerate() {
                let (image, ty) = (row / self.th, row % self.th);
                let at = o * len + slot * tw;
                // Aᵀ M across the rows: s[r][j] for output row r of the block, column j
                for j in 0..4 {
                    let run = |i: usize| &m[(i * 4 + j) * stride + at..][..tw];
                    let (m0, m1, m2, m3) = (run(0), run(1), run(2), run(3));
                    let (s0, s1) = s.split_at_mut(4 * tw);
                    let (s0, s1) = (&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]);
                    for p in 0..tw {
                        s0[p] = m0[p] + m1[p] + m2[p];
                        s1[p] = m1[p] - m2[p] - m3[p];
                    }
                }
                let dst = (image * self.c_out + o) * plane;
                for r in 0..2 {
                    let oy = 2 * ty + r;
                    if oy >= self.ho {
                        break;
                    }
                    let col = |j: usize| &s[(r * 4 + j) * tw..][..tw];
                    let (a0, a1, a2, a3) = (col(0), col(1), col(2), col(3));
                    for p in 0..tw {
                        line[2 * p] = a0[p] + a1[p] + a2[p];
                        line[2 * p + 1] = a1[p] - a2[p] - a3[p];
                    }
                    // SAFETY: output row oy of this block row, written by this call only.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            line.as_ptr(),
                            y.ptr().add(dst + oy * self.wo),
                            self.wo,
                        )
                    };
                }
            }
        }
    }
}

/// `(x, U) -> conv2d(x, w)` for a 3×3 kernel, stride 1, with `U` from [`transform_weight`];
/// `weight` is the untransformed kernel, for the input gradient.
#[derive(Clone, Debug)]
pub(crate) struct WinogradConv {
    pub padding: usize,
    pub weight: Tensor,
}

impl CustomOp2 for WinogradConv {
    fn name(&self) -> &'static str {
        "ddim-conv2d-winograd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let conv = ConvGeometry::new(xl.dims(), self.weight.dims(), 1, self.padding)?;
        if ul.dims() != [16, conv.c_out, conv.c_in] {
            candle_core::bail!(
                "winograd: transformed weight has shape {:?}, expected {:?} for a {:?} kernel",
                ul.dims(),
                [16, conv.c_out, conv.c_in],
                self.weight.dims()
            )
        }
        let (x, u) = (
            f32_slice(xs, xl, "conv2d", "input")?,
            f32_slice(us, ul, "conv2d", "weight")?,
        );
        forward(x, &conv, u)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = super::conv::input_grad(x, &self.weight, &dy.contiguous()?, 1, self.padding)?;
        Ok((Some(dx), None))
    }
}

/// `conv2d(x, weight)` for a 3×3 kernel, stride 1, `padding`, by Winograd F(2×2, 3×3), with
/// `u = transform_weight(weight)` made beforehand; f32 on the CPU only.
pub fn conv3x3(x: &Tensor, u: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        u,
        WinogradConv {
            padding,
            weight: weight.clone(),
        },
    )
}

/// The Winograd convolution `conv` (3×3, stride 1) of `x` with the transformed weight `u`
/// from [`transform_weight_values`].
pub(crate) fn forward(x: &[f32], conv: &ConvGeometry, u: &[f32]) -> Result<(CpuStorage, Shape)> {
    let g = Geometry::new(conv)?;
    if u.len() != 16 * g.c_out * g.c_in || x.len() != g.b * g.c_in * g.h * g.w {
        candle_core::bail!(
            "winograd: {} input or {} weight values do not fit {conv:?}",
            x.len(),
            u.len()
        )
    }
    let total = g.b * g.c_out * g.ho * g.wo;
    let block_rows = g.b * g.th;
    let threads = rayon::current_num_threads().max(1);
    // `gemm` computes our row-major products as their transposes, so a chunk's block count is
    // the row count of its micro-kernel, which takes 16 rows at a time (two AVX registers):
    // thinner chunks (8×8 images at batch 1) ran its half-empty 8-row edge kernel. Such
    // images go in fewer, wider chunks, and then `gemm` spreads over the threads instead.
    let per_chunk = (CHUNK_FLOATS / (16 * (g.c_in + g.c_out) * g.tw))
        .max(1)
        .min(block_rows.div_ceil(threads).max(1))
        .max(MIN_GEMM_ROWS.div_ceil(g.tw))
        .min(block_rows.max(1));
    let chunks: Vec<Range<usize>> = (0..block_rows)
        .step_by(per_chunk)
        .map(|r| r..(r + per_chunk).min(block_rows))
        .collect();
    let (parallel, par) = if threads > 1 && chunks.len() >= threads {
        (true, Parallelism::None)
    } else if threads > 1 {
        (false, Parallelism::Rayon(threads))
    } else {
        (false, Parallelism::None)
    };
    let mut y: Vec<f32> = Vec::with_capacity(total);
    let out = Out(y.as_mut_ptr());
    let (ci, co) = (g.c_in, g.c_out);
    let run = |rows: &Range<usize>| {
        let len = rows.len() * g.tw;
        with_buffer(&COLUMNS, 16 * ci * len, |v| {
            g.transform_input(x, rows.clone(), v);
            with_buffer(&BLOCK, 16 * co * len, |m| {
                for xi in 0..16 {
                    let (uxi, vxi) = (
                        &u[xi * co * ci..][..co * ci],
                        &v[xi * ci * len..][..ci * len],
                    );
                    let dst = m[xi * co * len..][..co * len].as_mut_ptr();
                    // SAFETY: `m` is this thread's buffer and holds co × len values here.
                    unsafe {
                        matmul(
                            co,
                            len,
                            ci,
                            dst,
                            len,
                            false,
                            uxi,
                            (ci, 1),
                            vxi,
                            (len, 1),
                            par,
                        )
                    };
                }
                // SAFETY: chunks hold disjoint block rows, so disjoint output rows.
                unsafe { g.transform_output(m, rows.clone(), out) };
            });
        });
    };
    if parallel {
        chunks.par_iter().for_each(run);
    } else {
        chunks.iter().for_each(run);
    }
    // SAFETY: every output pixel lies in exactly one 2×2 block, written above.
    unsafe { y.set_len(total) };
    Ok((CpuStorage::F32(y), Shape::from((g.b, g.c_out, g.ho, g.wo))))
}

/// Whether a convolution of `x` `(b, c, h, w)` with a 3×3 stride-1 kernel is worth Winograd
/// here: enough 2×2 output blocks per thread for the 16 GEMMs to stay efficient.
pub(crate) fn worth_it(x: &[usize], padding: usize) -> bool {
    let &[b, _, h, w] = x else { return false };
    if h + 2 * padding < 3 || w + 2 * padding < 3 {
        return false;
    }
    let blocks = b * (h + 2 * padding - 2).div_ceil(2) * (w + 2 * padding - 2).div_ceil(2);
    blocks >= MIN_BLOCKS_PER_THREAD * rayon::current_num_threads().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_same_gradients, max_diff, randn};
    use candle_core::Var;

    /// Winograd equals candle's direct convolution (forward, and the input gradient), for
    /// padding 0 and 1, odd and even sizes, one and several chunks and images.
    #[test]
    fn matches_direct_convolution() {
        for (seed, &(b, c, h, w, o, p)) in [
            (1, 3, 8, 8, 4, 1),
            (2, 5, 7, 9, 3, 1),
            (3, 4, 6, 5, 6, 0),
            (1, 16, 12, 12, 8, 1),
            (2, 2, 3, 3, 2, 0),
        ]
        .iter()
        .enumerate()
        {
            let s = seed as u64;
            let x = Var::from_tensor(&randn(&[b, c, h, w], s, 1.0, 0.0)).unwrap();
            let wt = randn(&[o, c, 3, 3], 50 + s, 1.0, 0.0);
            let u = transform_weight(&wt).unwrap();
            let op = WinogradConv {
                padding: p,
                weight: wt.clone(),
            };
            let ours = x.apply_op2(&u, op).unwrap();
            let theirs = x.conv2d(&wt, p, 1, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let scale = theirs
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .max_all()
                .unwrap();
            let tol = 1e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
            assert!(
                max_diff(&ours, &theirs) < tol,
                "{seed}: {}",
                max_diff(&ours, &theirs)
            );
            assert_same_gradients(&ours, &theirs, &[&x], 90 + s, 1e-4);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = randn(&[1, 3, 4, 4], 0, 1.0, 0.0);
        let u = transform_weight(&randn(&[2, 4, 3, 3], 1, 1.0, 0.0)).unwrap();
        let op = WinogradConv {
            padding: 1,
            weight: randn(&[2, 4, 3, 3], 1, 1.0, 0.0),
        };
        let err = x.apply_op2(&u, op).unwrap_err().to_string();
        assert!(err.contains("3 channels"), "{err}");
        // a transformed weight that is not the kernel's
        let op = WinogradConv {
            padding: 1,
            weight: randn(&[2, 3, 3, 3], 1, 1.0, 0.0),
        };
        let err = x.apply_op2(&u, op).unwrap_err().to_string();
        assert!(err.contains("[16, 2, 3]"), "{err}");
        assert!(transform_weight(&randn(&[2, 3, 1, 1], 1, 1.0, 0.0)).is_err());
    }
}
