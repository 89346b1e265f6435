//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3) and F(4×4, 3×3)
//! (Lavin & Gray 2015, arXiv:1509.09308) on the CPU, for inference.
//!
//! Each m×m block of outputs comes from an α×α block of inputs, α = m + 2. With the weights
//! transformed once to `U = G g Gᵀ` (α² matrices of `c_out × c_in`) and each input block to
//! `V = Bᵀ d B`, the α² element-wise products over channels are α² GEMMs `M_ξ = U_ξ · V_ξ`,
//! and `y = Aᵀ M A` gives the outputs. Per m² outputs and channel pair that is α² multiply-adds
//! where im2col + GEMM needs 9m²: 2.25 times fewer for F(2×2) (16 against 36), 4 times fewer
//! for F(4×4) (36 against 144). The price of F(4×4) is memory, its transformed weight holds
//! 36/9 of the 3×3 weight's values (F(2×2): 16/9), and rounding: its transforms hold 4, 5, ⅙
//! and 1/24 where F(2×2)'s hold only 0, ±1 and ±½. [`Tile::for_output`] picks it only where
//! the images are large and many enough for its blocks. The parity tests compare both with the direct
//! convolution.
//!
//! The blocks are cut into chunks of [`CHUNK_FLOATS`] scratch values, spread over threads like
//! the tiles of [`super::conv`]. Used by [`super::Conv2d`] when its weight is not a training
//! variable (the transformed weight is computed once and kept), and with F(2×2) by the training
//! forward pass (the weight transformed at every call); gradients flow to the input through the
//! im2col kernels.

use std::ops::Range;

use candle_core::{CpuStorage, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::gemm::{matmul, with_buffer, Out, BLOCK, COLUMNS};
use super::geometry::Geometry as ConvGeometry;

/// Scratch values per chunk of blocks (input and product transforms together): 4 MiB, as
/// [`super::conv`]'s column tiles. Unit tests use a tiny one to cut images into many chunks.
const CHUNK_FLOATS: usize = if cfg!(test) { 1 << 10 } else { 1 << 20 };

/// The fewest blocks a chunk gets when the image has them: one full micro-kernel height of
/// the `gemm` crate's f32 AVX kernels.
const MIN_GEMM_ROWS: usize = 16;

/// Below this many output blocks per thread, the GEMMs are too thin and im2col wins. Timed
/// inside whole sampling runs of the cifar10-32 UNet (its weights no longer in cache, unlike a
/// kernel bench that repeats one convolution): at 256 channels and 8×8, im2col took 0.59× F(2×2)'s
/// time at batch 1 (16 blocks) and 0.76× at batch 2 (32 blocks); at 64 blocks, F(2×2) took
/// 0.74× im2col's time at 256×16×16 and batch 1, and 1.06× at 256×8×8 and batch 4.
pub(crate) const MIN_BLOCKS_PER_THREAD: usize = 32;

/// The fewest 4×4 blocks for which F(4×4) beats F(2×2) ([`Tile::for_output`]).
pub const MIN_F4_BLOCKS: usize = 64;

/// The output block size: which Winograd algorithm runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): 2×2 outputs from 4×4 inputs, 16 GEMMs.
    F2,
    /// F(4×4, 3×3): 4×4 outputs from 6×6 inputs, 36 GEMMs.
    F4,
}

impl Tile {
    /// Outputs per block side, m.
    pub fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Inputs per block side, α = m + 2.
    pub fn alpha(self) -> usize {
        self.m() + 2
    }

    /// Values per transformed block, α²: the number of GEMMs.
    pub fn points(self) -> usize {
        self.alpha() * self.alpha()
    }

    /// The algorithm for `b` images of `ho × wo` outputs from `c_in` channels: F(4×4) from
    /// 16×16 up where its blocks number at least [`MIN_F4_BLOCKS`] (enough rows for the GEMMs)
    /// and the memory it adds, 20/9 of the 3×3 weight, is at most 8 times the output
    /// (`20 · c_in ≤ 8 · b · ho · wo`); F(2×2) elsewhere.
    ///
    /// Measured on 2 threads (medians of 20 alternating calls, 3×3 convolutions of the
    /// cifar10-32 UNet's shapes): F(4×4) took 0.75× F(2×2)'s time at 16×128×32×32 → 128,
    /// 0.89× at 16×256×16×16 → 256 and 0.69× at 1×128×32×32 → 128, but 1.2× at
    /// 1×256×16×16 → 256 (16 blocks). The memory bound keeps F(4×4) off the low-resolution
    /// levels, where most of a UNet's weights are: the cifar10-32 UNet's transformed weights
    /// take 282 MiB at batch 16 (194 with F(2×2) only); the celebahq-256 one at batch 1 uses
    /// F(4×4) from 64×64 up, about 110 MiB more than F(2×2) only, where from 32×32 up it
    /// added 196 MiB and put the peak RSS past diffusers'.
    pub fn for_output(b: usize, c_in: usize, ho: usize, wo: usize) -> Tile {
        let blocks = b * ho.div_ceil(4) * wo.div_ceil(4);
        if ho >= 16 && wo >= 16 && blocks >= MIN_F4_BLOCKS && 20 * c_in <= 8 * b * ho * wo {
            Tile::F4
        } else {
            Tile::F2
        }
    }

    /// The algorithm whose transformed weights have `points` matrices.
    pub(crate) fn from_points(points: usize) -> Option<Tile> {
        [Tile::F2, Tile::F4]
            .into_iter()
            .find(|t| t.points() == points)
    }

    /// `G · (a, b, c)` into `out[..α]`, in f32. F(2×2)'s G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]
    /// is exact but for the sums' rounding; F(4×4)'s G = [¼ 0 0; -⅙ -⅙ -⅙; -⅙ ⅙ -⅙;
    /// 1/24 1/12 ⅙; 1/24 -1/12 ⅙; 0 0 1] rounds its sixths, twelfths and 24ths once more.
    fn weight_1d(self, a: f32, b: f32, c: f32, out: &mut [f32; 6]) {
        match self {
            Tile::F2 => {
                out[..4].copy_from_slice(&[a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]);
            }
            Tile::F4 => {
                let (even, odd) = (a + c, b);
                let (s, t) = (a / 24.0 + c / 6.0, b / 12.0);
                *out = [
                    a / 4.0,
                    -(even + odd) / 6.0,
                    -(even - odd) / 6.0,
                    s + t,
                    s - t,
                    c,
                ];
            }
        }
    }

    /// `out[i] = Σ_k Bᵀ[i][k] · inp[k]`, element-wise over runs of `n` values (the input
    /// transform along one axis).
    fn input_1d(self, inp: &[&[f32]], out: &mut [&mut [f32]], n: usize) {
        match (self, inp, out) {
            (Tile::F2, &[i0, i1, i2, i3], [o0, o1, o2, o3]) => {
                input_f2([i0, i1, i2, i3], o0, o1, o2, o3, n)
            }
            (Tile::F4, &[i0, i1, i2, i3, i4, i5], [o0, o1, o2, o3, o4, o5]) => {
                input_f4([i0, i1, i2, i3, i4, i5], o0, o1, o2, o3, o4, o5, n)
            }
            _ => unreachable!("winograd: α input and output runs"),
        }
    }

    /// `out[r] = Σ_k Aᵀ[r][k] · inp[k]` over runs of `n` values (the output transform along
    /// one axis: α runs in, m out).
    fn output_1d(self, inp: &[&[f32]], out: &mut [&mut [f32]], n: usize) {
        match (self, inp, out) {
            (Tile::F2, &[i0, i1, i2, i3], [o0, o1]) => output_f2([i0, i1, i2, i3], o0, o1, n),
            (Tile::F4, &[i0, i1, i2, i3, i4, i5], [o0, o1, o2, o3]) => {
                output_f4([i0, i1, i2, i3, i4, i5], o0, o1, o2, o3, n)
            }
            _ => unreachable!("winograd: α input and m output runs"),
        }
    }
}

// The transforms below take each output run as its own `&mut` argument: LLVM then knows that
// no two of them alias (it does not for slices kept in an array) and vectorises the loops
// without run-time overlap checks, which it gives up on past a handful of pointers.

/// Bᵀ of F(2×2, 3×3) = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
#[inline(never)]
fn input_f2(
    i: [&[f32]; 4],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    n: usize,
) {
    let [i0, i1, i2, i3] = i.map(|r| &r[..n]);
    let (o0, o1, o2, o3) = (&mut o0[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for x in 0..n {
        o0[x] = i0[x] - i2[x];
        o1[x] = i1[x] + i2[x];
        o2[x] = i2[x] - i1[x];
        o3[x] = i1[x] - i3[x];
    }
}

/// Bᵀ of F(4×4, 3×3) = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0;
/// 0 2 -1 -2 1 0; 0 4 0 -5 0 1].
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn input_f4(
    i: [&[f32]; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
    n: usize,
) {
    let [i0, i1, i2, i3, i4, i5] = i.map(|r| &r[..n]);
    let (o0, o1, o2) = (&mut o0[..n], &mut o1[..n], &mut o2[..n]);
    let (o3, o4, o5) = (&mut o3[..n], &mut o4[..n], &mut o5[..n]);
    for x in 0..n {
        let a = i4[x] - 4.0 * i2[x];
        let b = i3[x] - 4.0 * i1[x];
        let c = i4[x] - i2[x];
        let d = 2.0 * (i3[x] - i1[x]);
        o0[x] = 4.0 * i0[x] - 5.0 * i2[x] + i4[x];
        o1[x] = a + b;
        o2[x] = a - b;
        o3[x] = c + d;
        o4[x] = c - d;
        o5[x] = 4.0 * i1[x] - 5.0 * i3[x] + i5[x];
    }
}

/// Aᵀ of F(2×2, 3×3) = [1 1 1 0; 0 1 -1 -1].
#[inline(never)]
fn output_f2(i: [&[f32]; 4], o0: &mut [f32], o1: &mut [f32], n: usize) {
    let [i0, i1, i2, i3] = i.map(|r| &r[..n]);
    let (o0, o1) = (&mut o0[..n], &mut o1[..n]);
    for x in 0..n {
        o0[x] = i0[x] + i1[x] + i2[x];
        o1[x] = i1[x] - i2[x] - i3[x];
    }
}

/// Aᵀ of F(4×4, 3×3) = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
#[inline(never)]
fn output_f4(
    i: [&[f32]; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    n: usize,
) {
    let [i0, i1, i2, i3, i4, i5] = i.map(|r| &r[..n]);
    let (o0, o1, o2, o3) = (&mut o0[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for x in 0..n {
        let p = i1[x] + i2[x];
        let q = i1[x] - i2[x];
        let r = i3[x] + i4[x];
        let s = i3[x] - i4[x];
        o0[x] = i0[x] + p + r;
        o1[x] = q + 2.0 * s;
        o2[x] = p + 4.0 * r;
        o3[x] = q + 8.0 * s + i5[x];
    }
}

/// `U = G g Gᵀ` of a `(c_out, c_in, 3, 3)` weight for `tile`, as α² row-major `c_out × c_in`
/// matrices.
pub fn transform_weight(w: &Tensor, tile: Tile) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("winograd: needs a 3x3 kernel, got {kh}x{kw}")
    }
    let g = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Tensor::from_vec(
        transform_weight_values(&g, c_out, c_in, tile),
        (tile.points(), c_out, c_in),
        w.device(),
    )
}

/// [`transform_weight`] packed for the bf16 kernel ([`super::bf16`]): a `u32` tensor of
/// α² packed `c_out × c_in` matrices, `(points, packed length)`.
pub fn transform_weight_bf16(w: &Tensor, tile: Tile) -> Result<Tensor> {
    let (c_out, c_in, _, _) = w.dims4()?;
    let u = transform_weight(w, tile)?.flatten_all()?.to_vec1::<f32>()?;
    let packed: Vec<u32> = u
        .par_chunks(c_out * c_in)
        .flat_map_iter(|m| super::bf16::pack_a(m, c_out, c_in))
        .collect();
    let len = super::bf16::packed_len(c_out, c_in);
    Tensor::from_vec(packed, (tile.points(), len), w.device())
}

/// [`transform_weight`] on the values of a `(c_out, c_in, 3, 3)` weight, in parallel over
/// channel pairs.
pub(crate) fn transform_weight_values(
    g: &[f32],
    c_out: usize,
    c_in: usize,
    tile: Tile,
) -> Vec<f32> {
    let pairs = c_out * c_in;
    assert_eq!(
        g.len(),
        9 * pairs,
        "winograd: weight is not {c_out}x{c_in}x3x3"
    );
    let (alpha, points) = (tile.alpha(), tile.points());
    let mut u = super::huge_page_vec(points * pairs);
    let out = Out(u.as_mut_ptr());
    // Each task transforms its pairs into a buffer of its own, the α² values of a pair side by
    // side, then writes each point's run of values into place: writing a pair's α² values
    // straight to their runs, `pairs` values apart (one cache set), stalled on the stores.
    const PAIRS_PER_TASK: usize = 2048;
    g.par_chunks(9 * PAIRS_PER_TASK)
        .enumerate()
        .for_each(|(task, gs)| {
            let n = gs.len() / 9;
            let mut local = vec![0f32; points * n];
            let mut t = [[0f32; 3]; 6];
            for (w, uk) in gs.chunks_exact(9).zip(local.chunks_exact_mut(points)) {
                // t = G g (α × 3), a column of g at a time; then U = t Gᵀ, a row of t at a time
                let mut row = [0f32; 6];
                for j in 0..3 {
                    tile.weight_1d(w[j], w[3 + j], w[6 + j], &mut row);
                    for (ti, &r) in t.iter_mut().zip(&row[..alpha]) {
                        ti[j] = r;
                    }
                }
                for (&[a, b, c], ui) in t.iter().zip(uk.chunks_exact_mut(alpha)) {
                    tile.weight_1d(a, b, c, &mut row);
                    ui.copy_from_slice(&row[..alpha]);
                }
            }
            for xi in 0..points {
                // SAFETY: `u` has room for points × pairs values; the run of point ξ of this
                // task's pairs is written by this task alone.
                unsafe {
                    let run = out.ptr().add(xi * pairs + task * PAIRS_PER_TASK);
                    for (k, uk) in local.chunks_exact(points).enumerate() {
                        *run.add(k) = uk[xi];
                    }
                }
            }
        });
    // SAFETY: every (ξ, pair) slot was written above.
    unsafe { u.set_len(points * pairs) };
    u
}

/// The geometry of one Winograd convolution: a 3×3, stride-1 [`ConvGeometry`], the algorithm
/// and its output blocks.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    conv: ConvGeometry,
    tile: Tile,
    /// Output blocks per column and per row.
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
    fn new(conv: &ConvGeometry, tile: Tile) -> Result<Self> {
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
            tile,
            th: conv.ho.div_ceil(tile.m()),
            tw: conv.wo.div_ceil(tile.m()),
        })
    }

    /// `V = Bᵀ d B` of the blocks of block rows `rows` (of the whole batch, `th` per image)
    /// for every input channel: value ξ of block `p` (counted from the chunk's first) of
    /// channel `c` at `v[ξ · stride + c · len + p]`, `len` the chunk's block count.
    ///
    /// A channel at a time, each step one long contiguous run over all the chunk's block rows,
    /// which the compiler vectorises: the α input rows of every block row side by side
    /// (zero-padded, `m·(tw + 1)` columns each), `Bᵀ` across them, each result split into its
    /// m column phases (column `m·p + q` at `phase[q][p]`), then `Bᵀ` across columns as
    /// shifted runs of those (column `m·p + k` of block `p` is `phase[k mod m][p + k div m]`),
    /// block row by block row straight into `v`.
    fn transform_input(&self, x: &[f32], rows: Range<usize>, v: &mut [f32], stride: usize) {
        let (tile, tw, plane, pad) = (self.tile, self.tw, self.h * self.w, self.padding);
        let (m, alpha, count) = (tile.m(), tile.alpha(), rows.len());
        let len = count * tw;
        let width = m * (tw + 1);
        let (run, prun) = (count * width, count * (tw + 1));
        let mut d = vec![0f32; alpha * run];
        let mut t = vec![0f32; alpha * run];
        let mut phases = vec![0f32; m * prun];
        for c in 0..self.c_in {
            for (slot, row) in rows.clone().enumerate() {
                let (image, ty) = (row / self.th, row % self.th);
                let src = &x[(image * self.c_in + c) * plane..][..plane];
                for (i, di) in d.chunks_exact_mut(run).enumerate() {
                    let dr = &mut di[slot * width..][..width];
                    dr.fill(0.0);
                    let yy = (m * ty + i) as isize - pad as isize;
                    if yy < 0 || yy >= self.h as isize {
                        continue;
                    }
                    let line = &src[yy as usize * self.w..][..self.w];
                    let n = self.w.min(width - pad);
                    dr[pad..pad + n].copy_from_slice(&line[..n]);
                }
            }
            let mut inp: [&[f32]; 6] = [&[]; 6];
            let mut out: [&mut [f32]; 6] = Default::default();
            for (r, di) in inp.iter_mut().zip(d.chunks_exact(run)) {
                *r = di;
            }
            for (r, ti) in out.iter_mut().zip(t.chunks_exact_mut(run)) {
                *r = ti;
            }
            tile.input_1d(&inp[..alpha], &mut out[..alpha], run);
            for (i, ti) in t.chunks_exact(run).enumerate() {
                split_phases(ti, &mut phases, m, prun);
                for slot in 0..count {
                    let mut inp: [&[f32]; 6] = [&[]; 6];
                    for (k, r) in inp.iter_mut().take(alpha).enumerate() {
                        *r = &phases[(k % m) * prun + slot * (tw + 1) + k / m..][..tw];
                    }
                    let mut out: [&mut [f32]; 6] = Default::default();
                    let dst = v[i * alpha * stride + c * len + slot * tw..].chunks_mut(stride);
                    for (r, vj) in out.iter_mut().zip(dst) {
                        *r = vj;
                    }
                    tile.input_1d(&inp[..alpha], &mut out[..alpha], tw);
                }
            }
        }
    }

    /// `y = Aᵀ M A` of the blocks of block rows `rows` from the products `mp` (value ξ of
    /// block `p` of output channel `o` at `mp[ξ · stride + o · len + p]`), written into the
    /// output: an output channel at a time, each transform one run over the chunk's blocks.
    ///
    /// # Safety
    /// `y` must be the `(b, c_out, ho, wo)` output, and no other thread may write these rows.
    unsafe fn transform_output(&self, mp: &[f32], rows: Range<usize>, y: Out, stride: usize) {
        let (tile, tw, plane) = (self.tile, self.tw, self.ho * self.wo);
        let (m, alpha) = (tile.m(), tile.alpha());
        let len = rows.len() * tw;
        // s[(r · α + j) · len + p]: output row r of block p, before the column transform
        let mut s = vec![0f32; m * alpha * len];
        let mut phases = vec![0f32; m * len];
        let mut line = vec![0f32; m * tw];
        for o in 0..self.c_out {
            let at = o * len;
            // Aᵀ M across the rows, column j of the blocks at a time
            for j in 0..alpha {
                let mut inp: [&[f32]; 6] = [&[]; 6];
                for (i, r) in inp.iter_mut().take(alpha).enumerate() {
                    *r = &mp[(i * alpha + j) * stride + at..][..len];
                }
                let mut out: [&mut [f32]; 6] = Default::default();
                for (r, sr) in out.iter_mut().zip(s.chunks_exact_mut(alpha * len)) {
                    *r = &mut sr[j * len..][..len];
                }
                tile.output_1d(&inp[..alpha], &mut out[..m], len);
            }
            for (r, sr) in s.chunks_exact(alpha * len).enumerate() {
                let mut inp: [&[f32]; 6] = [&[]; 6];
                for (run, col) in inp.iter_mut().zip(sr.chunks_exact(len)) {
                    *run = col;
                }
                let mut out: [&mut [f32]; 6] = Default::default();
                for (run, ph) in out.iter_mut().zip(phases.chunks_exact_mut(len)) {
                    *run = ph;
                }
                tile.output_1d(&inp[..alpha], &mut out[..m], len);
                for (slot, row) in rows.clone().enumerate() {
                    let (image, ty) = (row / self.th, row % self.th);
                    let oy = m * ty + r;
                    if oy >= self.ho {
                        continue;
                    }
                    let dst = (image * self.c_out + o) * plane + oy * self.wo;
                    if m * tw == self.wo {
                        // SAFETY: output row oy of this chunk's block row (`wo` values), written
                        // by this call only.
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(y.ptr().add(dst), m * tw) };
                        interleave(&phases, len, slot * tw, row, m);
                    } else {
                        interleave(&phases, len, slot * tw, &mut line, m);
                        // SAFETY: as above; the last block's columns past `wo` are dropped.
                        unsafe {
                            std::ptr::copy_nonoverlapping(line.as_ptr(), y.ptr().add(dst), self.wo)
                        };
                    }
                }
            }
        }
    }
}

/// `phases[q · n + p] = t[m · p + q]` for the `m` phases of `t` (`m · n` values).
fn split_phases(t: &[f32], phases: &mut [f32], m: usize, n: usize) {
    fn split<const M: usize>(t: &[f32], phases: &mut [f32], n: usize) {
        let mut it = phases.chunks_exact_mut(n);
        let ph: [&mut [f32]; M] = std::array::from_fn(|_| it.next().expect("M phases"));
        for (p, c) in t.chunks_exact(M).take(n).enumerate() {
            for q in 0..M {
                ph[q][p] = c[q];
            }
        }
    }
    match m {
        2 => split::<2>(t, phases, n),
        4 => split::<4>(t, phases, n),
        _ => unreachable!("winograd: blocks of 2 or 4"),
    }
}

/// `line[m · p + q] = phases[q · n + at + p]` for the `line.len() / m` blocks from `at`:
/// the m phases of output row values back into one image row.
fn interleave(phases: &[f32], n: usize, at: usize, line: &mut [f32], m: usize) {
    fn merge<const M: usize>(phases: &[f32], n: usize, at: usize, line: &mut [f32]) {
        let tw = line.len() / M;
        let ph: [&[f32]; M] = std::array::from_fn(|q| &phases[q * n + at..][..tw]);
        for (p, l) in line.chunks_exact_mut(M).enumerate() {
            for q in 0..M {
                l[q] = ph[q][p];
            }
        }
    }
    match m {
        2 => merge::<2>(phases, n, at, line),
        4 => merge::<4>(phases, n, at, line),
        _ => unreachable!("winograd: blocks of 2 or 4"),
    }
}

/// A transformed weight: α² row-major `c_out × c_in` matrices ([`transform_weight_values`]),
/// or the same packed for the bf16 kernel ([`super::bf16::pack_a`], one after the other).
#[derive(Clone, Copy)]
pub(crate) enum Transformed<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u32]),
}

/// The Winograd convolution `conv` (3×3, stride 1) of `x` with the transformed weight `u`
/// for `tile`.
pub(crate) fn forward(
    x: &[f32],
    conv: &ConvGeometry,
    u: Transformed,
    tile: Tile,
) -> Result<(CpuStorage, Shape)> {
    let g = Geometry::new(conv, tile)?;
    let points = tile.points();
    let per_point = match u {
        Transformed::F32(_) => g.c_out * g.c_in,
        Transformed::Bf16(_) => super::bf16::packed_len(g.c_out, g.c_in),
    };
    let u_len = match u {
        Transformed::F32(u) => u.len(),
        Transformed::Bf16(u) => u.len(),
    };
    if u_len != points * per_point || x.len() != g.b * g.c_in * g.h * g.w {
        candle_core::bail!(
            "winograd: {} input or {} weight values do not fit {conv:?} with {tile:?}",
            x.len(),
            u_len
        )
    }
    let total = g.b * g.c_out * g.ho * g.wo;
    let block_rows = g.b * g.th;
    let threads = rayon::current_num_threads().max(1);
    // `gemm` computes our row-major products as their transposes, so a chunk's block count is
    // the row count of its micro-kernel, which takes 16 rows at a time (two AVX registers):
    // thinner chunks (8×8 images at batch 1) ran its half-empty 8-row edge kernel. Such
    // images go in fewer, wider chunks, and then `gemm` spreads over the threads instead.
    let most = (CHUNK_FLOATS / (points * (g.c_in + g.c_out) * g.tw))
        .max(1)
        .min(block_rows.div_ceil(threads).max(1))
        .max(MIN_GEMM_ROWS.div_ceil(g.tw))
        .min(block_rows.max(1));
    let least = MIN_GEMM_ROWS.div_ceil(g.tw).min(most);
    // Of the chunk sizes allowed, the one whose busiest thread has the fewest micro-kernel
    // rows to run, counting a partial 16 as whole (the larger chunk on a tie): 14 block rows
    // of 4 blocks (F(4×4) at 16×16) made chunks of 56 blocks, 3.5 micro-kernel heights, and
    // 64 block rows made 5 chunks for 2 threads.
    let busiest = |per: usize| {
        let rounds = block_rows.div_ceil(per).div_ceil(threads);
        rounds * (per * g.tw).div_ceil(MIN_GEMM_ROWS)
    };
    let per_chunk = (least..=most)
        .min_by_key(|&per| (busiest(per), std::cmp::Reverse(per)))
        .unwrap_or(most);
    let chunks: Vec<Range<usize>> = (0..block_rows)
        .step_by(per_chunk)
        .map(|r| r..(r + per_chunk).min(block_rows))
        .collect();
    // Chunks in parallel where there are enough of them; else the α² products of each chunk
    // in parallel (`gemm`'s own split of a thin product gave each thread a half-empty
    // micro-kernel).
    let parallel = threads > 1 && chunks.len() >= threads;
    let spread = threads > 1 && !parallel;
    let mut y: Vec<f32> = Vec::with_capacity(total);
    let out = Out(y.as_mut_ptr());
    let (ci, co) = (g.c_in, g.c_out);
    let run = |rows: &Range<usize>| {
        let len = rows.len() * g.tw;
        let (vs, ms) = (ci * len, co * len);
        with_buffer(&COLUMNS, points * vs, |v| {
            g.transform_input(x, rows.clone(), v, vs);
            with_buffer(&BLOCK, points * ms, |m| {
                let product = |(xi, mx): (usize, &mut [f32])| {
                    let vxi = &v[xi * vs..][..ci * len];
                    let uxi = match u {
                        Transformed::F32(u) => &u[xi * per_point..][..per_point],
                        Transformed::Bf16(u) => {
                            let uxi = &u[xi * per_point..][..per_point];
                            return super::bf16::matmul(uxi, co, ci, vxi, len, len, mx, len);
                        }
                    };
                    // SAFETY: `mx` is this product's own co × len values.
                    unsafe {
                        matmul(
                            co,
                            len,
                            ci,
                            mx.as_mut_ptr(),
                            len,
                            false,
                            uxi,
                            (ci, 1),
                            vxi,
                            (len, 1),
                            Parallelism::None,
                        )
                    };
                };
                if spread {
                    m.par_chunks_exact_mut(ms).enumerate().for_each(product);
                } else {
                    m.chunks_exact_mut(ms).enumerate().for_each(product);
                }
                // SAFETY: chunks hold disjoint block rows, so disjoint output rows.
                unsafe { g.transform_output(m, rows.clone(), out, ms) };
            });
        });
    };
    if parallel {
        chunks.par_iter().for_each(run);
    } else {
        chunks.iter().for_each(run);
    }
    // SAFETY: every output pixel lies in exactly one block, written above.
    unsafe { y.set_len(total) };
    Ok((CpuStorage::F32(y), Shape::from((g.b, g.c_out, g.ho, g.wo))))
}

/// Whether a convolution of `x` `(b, c, h, w)` with a 3×3 stride-1 kernel is worth Winograd
/// with `tile` here: enough output blocks per thread for the GEMMs to stay efficient.
pub(crate) fn worth_it(x: &[usize], padding: usize, tile: Tile) -> bool {
    let &[b, _, h, w] = x else { return false };
    if h + 2 * padding < 3 || w + 2 * padding < 3 {
        return false;
    }
    let m = tile.m();
    let blocks = b * (h + 2 * padding - 2).div_ceil(m) * (w + 2 * padding - 2).div_ceil(m);
    blocks >= MIN_BLOCKS_PER_THREAD * rayon::current_num_threads().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::{winograd_conv3x3 as conv3x3, WinogradConv};
    use crate::ops::testing::{assert_same_gradients, max_diff, randn};
    use candle_core::Var;

    /// Both algorithms equal candle's direct convolution (forward, and the input gradient),
    /// for padding 0 and 1, odd and even sizes, one and several chunks and images.
    #[test]
    fn matches_direct_convolution() {
        // One thread: the chunks one after the other. Three: chunks in parallel, or a chunk's
        // α² products spread over the threads where there are fewer chunks than threads.
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| matches_direct_convolution_here(threads));
        }
    }

    fn matches_direct_convolution_here(threads: usize) {
        for tile in [Tile::F2, Tile::F4] {
            for (seed, &(b, c, h, w, o, p)) in [
                (1, 3, 8, 8, 4, 1),
                (2, 5, 7, 9, 3, 1),
                (3, 4, 6, 5, 6, 0),
                (1, 16, 12, 12, 8, 1),
                (2, 2, 3, 3, 2, 0),
                (1, 3, 13, 11, 2, 1),
                (3, 2, 38, 40, 5, 1),
            ]
            .iter()
            .enumerate()
            {
                let s = seed as u64;
                let x = Var::from_tensor(&randn(&[b, c, h, w], s, 1.0, 0.0)).unwrap();
                let wt = randn(&[o, c, 3, 3], 50 + s, 1.0, 0.0);
                let u = transform_weight(&wt, tile).unwrap();
                assert_eq!(u.dims(), [tile.points(), o, c]);
                let op = WinogradConv {
                    padding: p,
                    weight: wt.clone(),
                };
                let ours = x.apply_op2(&u, op).unwrap();
                let theirs = x.conv2d(&wt, p, 1, 1, 1).unwrap();
                assert_eq!(ours.dims(), theirs.dims());
                let scale = theirs.abs().unwrap().max_all().unwrap();
                let tol = 1e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
                let err = max_diff(&ours, &theirs);
                assert!(err < tol, "{tile:?} {seed}, {threads} threads: {err}");
                assert_same_gradients(&ours, &theirs, &[&x], 90 + s, 1e-4);
            }
        }
    }

    /// F(4×4)'s rounding at a UNet's widths (256 input channels, activations and weights at
    /// their usual scales): within 3·10⁻⁵ of the largest output (1.1·10⁻⁵ measured), where
    /// F(2×2) stays within 10⁻⁶ of the direct convolution.
    #[test]
    fn f4_rounding_at_unet_widths() {
        let x = randn(&[1, 256, 16, 16], 7, 1.0, 0.0);
        let wt = randn(&[8, 256, 3, 3], 8, 0.02, 0.0);
        let direct = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        let scale = direct.abs().unwrap().max_all().unwrap();
        let scale = scale.to_scalar::<f32>().unwrap();
        for (tile, bound) in [(Tile::F2, 1e-6), (Tile::F4, 3e-5)] {
            let u = transform_weight(&wt, tile).unwrap();
            let ours = conv3x3(&x, &u, &wt, 1).unwrap();
            let rel = max_diff(&ours, &direct) / scale;
            assert!(rel < bound, "{tile:?}: {rel:e} of the largest output");
        }
    }

    #[test]
    fn the_tile_follows_the_output_size() {
        assert_eq!(Tile::for_output(1, 384, 32, 32), Tile::F4);
        assert_eq!(Tile::for_output(16, 768, 16, 16), Tile::F4);
        assert_eq!(Tile::for_output(1, 256, 16, 16), Tile::F2);
        assert_eq!(Tile::for_output(16, 256, 8, 8), Tile::F2);
        assert_eq!(Tile::for_output(16, 256, 32, 8), Tile::F2);
        // the celebahq-256 UNet at batch 1: F(4×4) at 64×64, not at 32×32
        assert_eq!(Tile::for_output(1, 512, 64, 64), Tile::F4);
        assert_eq!(Tile::for_output(1, 512, 32, 32), Tile::F2);
        assert_eq!((Tile::F2.points(), Tile::F4.points()), (16, 36));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = randn(&[1, 3, 4, 4], 0, 1.0, 0.0);
        let u = transform_weight(&randn(&[2, 4, 3, 3], 1, 1.0, 0.0), Tile::F2).unwrap();
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
        let err = x.apply_op2(&u, op.clone()).unwrap_err().to_string();
        assert!(
            err.contains("[16, 2, 4]") && err.contains("[16 or 36, 2, 3]"),
            "{err}"
        );
        let u = randn(&[25, 2, 3], 1, 1.0, 0.0);
        assert!(x.apply_op2(&u, op).is_err());
        assert!(transform_weight(&randn(&[2, 3, 1, 1], 1, 1.0, 0.0), Tile::F4).is_err());
    }
}
