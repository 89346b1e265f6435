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
//! The output pixels are cut into tiles of about [`COL_TILE_FLOATS`] / `(c_in·kh·kw)` columns:
//! runs of whole output rows of one image, or several whole images when an image is smaller
//! than a tile (the 8×8 and 4×4 levels of a UNet, where one image alone makes a thin GEMM).
//! Each thread keeps one column buffer of a tile's size for the whole run, so memory stays
//! bounded at any resolution and nothing is zeroed that is about to be overwritten. 1×1
//! convolutions with stride 1 and no padding read a single image's tile straight from the input.
//! Tiles are spread over threads when there are at least as many as threads; otherwise one
//! tile at a time runs with the GEMM itself split over the threads.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use super::f32_slice;
use super::gemm::{matmul, with_buffer, Out, BLOCK, COLUMNS};
use super::geometry::Geometry;
use super::winograd::{self, Tile as WinogradTile};
use rayon::prelude::*;

/// The size of one thread's column buffer, in f32 values (4 MiB): large enough for GEMMs of a
/// few hundred columns at the widest UNet layers, small enough to stay bounded at 256×256.
/// Unit tests use a tiny one so that their small shapes cut images into several row tiles.
const COL_TILE_FLOATS: usize = if cfg!(test) { 1 << 9 } else { 1 << 20 };

/// Output columns computed by one GEMM: output rows `rows` of the images `images` (all rows
/// when there is more than one image).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tile {
    images: Range<usize>,
    rows: Range<usize>,
}

impl Tile {
    fn cols(&self, g: &Geometry) -> usize {
        self.images.len() * self.rows.len() * g.wo
    }
}

impl Geometry {
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn n(&self) -> usize {
        self.ho * self.wo
    }

    fn per_in(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn per_out(&self) -> usize {
        self.c_out * self.n()
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The tiles covering every output pixel of the batch, image by image, rows in order.
    fn tiles(&self) -> Vec<Tile> {
        self.tiles_of(COL_TILE_FLOATS, rayon::current_num_threads().max(1))
    }

    /// [`Self::tiles`] for a column buffer of `floats` values and `threads` threads: at least
    /// one tile per thread where the batch has that many output rows, a multiple of the thread
    /// count where possible (balanced work), each within the buffer (or one output row).
    fn tiles_of(&self, floats: usize, threads: usize) -> Vec<Tile> {
        let n = self.n();
        if n == 0 || self.b == 0 {
            return Vec::new();
        }
        let target = (floats / self.k().max(1)).max(self.wo);
        let count = (self.b * n)
            .div_ceil(target)
            .max(threads)
            .next_multiple_of(threads);
        if count <= self.b {
            // whole images, `per` to a tile
            let per = self.b.div_ceil(count).min(target / n).max(1);
            return (0..self.b)
                .step_by(per)
                .map(|i| Tile {
                    images: i..(i + per).min(self.b),
                    rows: 0..self.ho,
                })
                .collect();
        }
        // runs of output rows, the same count in every image
        let parts = count.div_ceil(self.b).max(n.div_ceil(target));
        let rows = self.ho.div_ceil(parts).min(target / self.wo).max(1);
        let mut tiles = Vec::with_capacity(self.b * parts);
        for image in 0..self.b {
            for r in (0..self.ho).step_by(rows) {
                tiles.push(Tile {
                    images: image..image + 1,
                    rows: r..(r + rows).min(self.ho),
                });
            }
        }
        tiles
    }

    /// `(units run in parallel with single-threaded GEMMs, GEMM parallelism)`: the units in
    /// parallel when there are at least as many as threads, else one after another with each
    /// GEMM split over the threads.
    fn parallelism(units: usize) -> (bool, Parallelism) {
        let threads = rayon::current_num_threads().max(1);
        if threads == 1 {
            (false, Parallelism::None)
        } else if units >= threads {
            (true, Parallelism::None)
        } else {
            (false, Parallelism::Rayon(threads))
        }
    }

    /// Writes the columns of output rows `rows` of image `x` (`c_in × h × w`) into `col`: row
    /// `r = (c·kh + i)·kw + j` of the `k × len` block starts at `r · ld`, output pixel (oy, ox)
    /// is its column `(oy - rows.start)·wo + ox`.
    fn im2col(&self, x: &[f32], rows: Range<usize>, col: &mut [f32], ld: usize) {
        let (s, p) = (self.stride, self.padding as isize);
        let len = rows.len() * self.wo;
        for c in 0..self.c_in {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((c * self.kh + i) * self.kw + j) * ld..][..len];
                    for (out, oy) in row.chunks_exact_mut(self.wo).zip(rows.clone()) {
                        let iy = (oy * s) as isize - p + i as isize;
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        if s == 1 {
                            // ix = ox - p + j: one contiguous run of the source row
                            let (lo, hi) = self.run(j);
                            let shift = j as isize - p;
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

    /// Adds the windows of `col` (laid out as [`Self::im2col`] writes them) back into one image
    /// gradient `dx` (`c_in × h × w`).
    fn col2im(&self, col: &[f32], ld: usize, rows: Range<usize>, dx: &mut [f32]) {
        let (s, p) = (self.stride, self.padding as isize);
        let len = rows.len() * self.wo;
        for c in 0..self.c_in {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &col[((c * self.kh + i) * self.kw + j) * ld..][..len];
                    for (src, oy) in row.chunks_exact(self.wo).zip(rows.clone()) {
                        let iy = (oy * s) as isize - p + i as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        if s == 1 {
                            let (lo, hi) = self.run(j);
                            let shift = j as isize - p;
                            let d = &mut dst
                                [(lo as isize + shift) as usize..(hi as isize + shift) as usize];
                            for (o, &v) in d.iter_mut().zip(&src[lo..hi]) {
                                *o += v;
                            }
                            continue;
                        }
                        for (ox, &v) in src.iter().enumerate() {
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

    /// For stride 1: the output columns `lo..hi` whose kernel column `j` lands inside the input.
    fn run(&self, j: usize) -> (usize, usize) {
        let shift = j as isize - self.padding as isize;
        let lo = (-shift).clamp(0, self.wo as isize) as usize;
        let hi = (self.w as isize - shift).clamp(lo as isize, self.wo as isize) as usize;
        (lo, hi)
    }

    /// The columns of `tile` into `col` (`k × tile.cols()`), image after image.
    fn im2col_tile(&self, x: &[f32], tile: &Tile, col: &mut [f32]) {
        let (ld, per) = (tile.cols(self), self.rows_cols(tile));
        for (slot, image) in tile.images.clone().enumerate() {
            let xb = &x[image * self.per_in()..][..self.per_in()];
            self.im2col(xb, tile.rows.clone(), &mut col[slot * per..], ld);
        }
    }

    /// The columns one image contributes to `tile`.
    fn rows_cols(&self, tile: &Tile) -> usize {
        tile.rows.len() * self.wo
    }
}

/// [`with_buffer`] on the column buffer.
fn with_columns<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&COLUMNS, len, f)
}

/// Runs `f` on each unit, in parallel when `parallel`, else in order.
fn for_each_unit<T: Sync>(units: &[T], parallel: bool, f: impl Fn(&T) + Sync + Send) {
    if parallel {
        units.par_iter().for_each(f);
    } else {
        units.iter().for_each(f);
    }
}

/// The forward convolution: `(x, w) -> y`.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOp {
    /// Stride of both axes.
    pub stride: usize,
    /// Zero padding of all four sides.
    pub padding: usize,
    /// Run 3×3 stride-1 kernels by Winograd F(2×2, 3×3), the weight transformed at every call,
    /// where the output is large enough ([`winograd::worth_it`]); im2col + GEMM
    /// otherwise.
    pub winograd: bool,
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
        if self.winograd
            && (g.kh, g.kw, g.stride) == (3, 3, 1)
            && winograd::worth_it(xl.dims(), g.padding, WinogradTile::F2)
        {
            // Winograd with the weight transformed now (a training step changes it every time;
            // the transform costs ~40 flops per weight, the convolution 2·B·H·W per weight).
            let u = winograd::transform_weight_values(w, g.c_out, g.c_in, WinogradTile::F2);
            return winograd::forward(x, &g, winograd::Transformed::F32(&u), WinogradTile::F2);
        }
        let (k, n, total) = (g.k(), g.n(), g.b * g.per_out());
        let tiles = g.tiles();
        let (parallel, par) = Geometry::parallelism(tiles.len());
        let mut y: Vec<f32> = Vec::with_capacity(total);
        let out = Out(y.as_mut_ptr());
        for_each_unit(&tiles, parallel, |tile| {
            let cols = tile.cols(&g);
            let first = tile.images.start * g.per_out() + tile.rows.start * g.wo;
            if tile.images.len() == 1 {
                // y_b[:, rows] = W · col: straight into the output (row stride n)
                // SAFETY: the tile's columns of its image are written by this tile only and
                // lie inside `y`'s capacity.
                let dst = unsafe { out.ptr().add(first) };
                if g.is_pointwise() {
                    let xb = &x[tile.images.start * g.per_in() + tile.rows.start * g.wo..];
                    unsafe { matmul(g.c_out, cols, k, dst, n, false, w, (k, 1), xb, (n, 1), par) };
                } else {
                    with_columns(k * cols, |col| {
                        g.im2col_tile(x, tile, col);
                        unsafe {
                            matmul(
                                g.c_out,
                                cols,
                                k,
                                dst,
                                n,
                                false,
                                w,
                                (k, 1),
                                col,
                                (cols, 1),
                                par,
                            )
                        };
                    });
                }
                return;
            }
            // several whole images: one GEMM into a scratch block, then each image's rows out
            with_buffer(&BLOCK, g.c_out * cols, |block| {
                with_columns(k * cols, |col| {
                    g.im2col_tile(x, tile, col);
                    // SAFETY: `block` is this thread's and holds c_out × cols values.
                    unsafe {
                        matmul(
                            g.c_out,
                            cols,
                            k,
                            block.as_mut_ptr(),
                            cols,
                            false,
                            w,
                            (k, 1),
                            col,
                            (cols, 1),
                            par,
                        )
                    };
                });
                for (slot, _) in tile.images.clone().enumerate() {
                    for c in 0..g.c_out {
                        let src = &block[c * cols + slot * n..][..n];
                        // SAFETY: whole images of this tile, written by this tile only.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.as_ptr(),
                                out.ptr().add(first + slot * g.per_out() + c * n),
                                n,
                            )
                        };
                    }
                }
            });
        });
        // SAFETY: the tiles cover every output pixel of every image for every channel, so all
        // `total` values were written above.
        unsafe { y.set_len(total) };
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

/// `dy`'s columns of `tile` as a `c_out × cols` matrix: straight from `dy` (row stride n) for a
/// single image, or gathered into `block` for several.
fn dy_tile<'a>(
    g: &Geometry,
    dy: &'a [f32],
    tile: &Tile,
    block: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    let n = g.n();
    if tile.images.len() == 1 {
        let start = tile.images.start * g.per_out() + tile.rows.start * g.wo;
        return (&dy[start..], n);
    }
    let cols = tile.cols(g);
    if block.len() < g.c_out * cols {
        block.resize(g.c_out * cols, 0.0);
    }
    for (slot, image) in tile.images.clone().enumerate() {
        for c in 0..g.c_out {
            block[c * cols + slot * n..][..n]
                .copy_from_slice(&dy[image * g.per_out() + c * n..][..n]);
        }
    }
    (&block[..g.c_out * cols], cols)
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
        let k = g.k();
        let mut dx = vec![0f32; g.b * g.per_in()];
        // Tiles of one image overlap in dx (windows cross tile rows): a unit is all the tiles
        // of a run of images, and units own disjoint images.
        let tiles = g.tiles();
        let mut units: Vec<&[Tile]> = Vec::new();
        let mut start = 0;
        for i in 1..=tiles.len() {
            if i == tiles.len() || tiles[i].images.start != tiles[i - 1].images.start {
                units.push(&tiles[start..i]);
                start = i;
            }
        }
        let (parallel, par) = Geometry::parallelism(units.len());
        let out = Out(dx.as_mut_ptr());
        for_each_unit(&units, parallel, |unit| {
            let mut block = Vec::new();
            for tile in unit.iter() {
                let cols = tile.cols(&g);
                let (dyt, ld) = dy_tile(&g, dy, tile, &mut block);
                let first = tile.images.start * g.per_in();
                // SAFETY: this unit's images are written by this unit only.
                let dxs = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.ptr().add(first),
                        tile.images.len() * g.per_in(),
                    )
                };
                // Wᵀ (k × c_out) · dy (c_out × cols) into `dst` with row stride `rs`
                let step = |dst: *mut f32, rs: usize| {
                    // SAFETY: callers pass k rows of `cols` values at stride `rs` of their own.
                    unsafe {
                        matmul(
                            k,
                            cols,
                            g.c_out,
                            dst,
                            rs,
                            false,
                            w,
                            (1, k),
                            dyt,
                            (ld, 1),
                            par,
                        )
                    }
                };
                if g.is_pointwise() && tile.images.len() == 1 {
                    // a 1×1 kernel's columns are dx itself (row stride n)
                    step(dxs[tile.rows.start * g.wo..].as_mut_ptr(), g.n());
                    continue;
                }
                with_columns(k * cols, |col| {
                    step(col.as_mut_ptr(), cols);
                    let per = g.rows_cols(tile);
                    for slot in 0..tile.images.len() {
                        let dxb = &mut dxs[slot * g.per_in()..][..g.per_in()];
                        g.col2im(&col[slot * per..], cols, tile.rows.clone(), dxb);
                    }
                });
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
        let (k, n) = (g.k(), g.n());
        let tiles = g.tiles();
        let threads = rayon::current_num_threads().max(1);
        let (parallel, par) = Geometry::parallelism(tiles.len());
        // One partial dW per group of consecutive tiles, summed in order at the end: the same
        // sums whichever thread runs a group (deterministic for a given thread count).
        let groups: Vec<&[Tile]> = if parallel {
            tiles.chunks(tiles.len().div_ceil(threads).max(1)).collect()
        } else {
            vec![&tiles[..]]
        };
        let partial = |group: &&[Tile]| {
            let mut dw = vec![0f32; g.c_out * k];
            let mut block = Vec::new();
            for (i, tile) in group.iter().enumerate() {
                let cols = tile.cols(&g);
                let (dyt, ld) = dy_tile(&g, dy, tile, &mut block);
                let dst = dw.as_mut_ptr();
                // dy (c_out × cols) · colᵀ (cols × k), colᵀ read with column stride `cs`
                let step = |col: &[f32], cs: usize| {
                    // SAFETY: `dw` is this group's own c_out × k buffer.
                    unsafe {
                        matmul(
                            g.c_out,
                            k,
                            cols,
                            dst,
                            k,
                            i > 0,
                            dyt,
                            (ld, 1),
                            col,
                            (1, cs),
                            par,
                        )
                    }
                };
                if g.is_pointwise() && tile.images.len() == 1 {
                    // a 1×1 kernel's columns are the input itself
                    step(
                        &x[tile.images.start * g.per_in() + tile.rows.start * g.wo..],
                        n,
                    );
                } else {
                    with_columns(k * cols, |col| {
                        g.im2col_tile(x, tile, col);
                        step(col, cols);
                    });
                }
            }
            dw
        };
        let partials: Vec<Vec<f32>> = if parallel {
            groups.par_iter().map(partial).collect()
        } else {
            groups.iter().map(partial).collect()
        };
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

/// The gradient of `conv2d(x, w, stride, padding)` with respect to `x`, given `dy`.
pub(crate) fn input_grad(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    dy.apply_op2_no_bwd(
        w,
        &Conv2dInputGrad {
            stride,
            padding,
            input: (x.dim(2)?, x.dim(3)?),
        },
    )
}

/// `conv2d(x, w)` with square `stride` and `padding`: the GEMM kernels above for contiguous
/// f32 tensors on the CPU, candle's own `conv2d` everywhere else (CUDA, Metal, other dtypes).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == x.dtype() {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Conv2dOp {
                stride,
                padding,
                winograd: true,
            },
        )
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// `(x, U) -> conv2d(x, w)` for a 3×3 kernel, stride 1, with `U` from [`winograd::transform_weight`]
/// (its first dimension, 16 or 36, says which [`WinogradTile`]); `weight` is the untransformed kernel,
/// for the input gradient.
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
        let conv = Geometry::new(xl.dims(), self.weight.dims(), 1, self.padding)?;
        let tile = ul
            .dims()
            .first()
            .and_then(|&p| WinogradTile::from_points(p));
        let packed = matches!(us, CpuStorage::U32(_));
        let shape = |t: &WinogradTile| match packed {
            false => ul.dims() == [t.points(), conv.c_out, conv.c_in],
            true => ul.dims() == [t.points(), super::bf16::packed_len(conv.c_out, conv.c_in)],
        };
        let Some(tile) = tile.filter(shape) else {
            candle_core::bail!(
                "winograd: transformed weight has shape {:?}, expected [16 or 36, {}, {}] for a \
                 {:?} kernel (or [16 or 36, n] packed for bf16)",
                ul.dims(),
                conv.c_out,
                conv.c_in,
                self.weight.dims()
            )
        };
        let x = f32_slice(xs, xl, "conv2d", "input")?;
        let u = match us {
            CpuStorage::U32(data) => match ul.contiguous_offsets() {
                Some((start, end)) => winograd::Transformed::Bf16(&data[start..end]),
                None => candle_core::bail!("conv2d: weight must be contiguous"),
            },
            _ => winograd::Transformed::F32(f32_slice(us, ul, "conv2d", "weight")?),
        };
        winograd::forward(x, &conv, u, tile)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = input_grad(x, &self.weight, &dy.contiguous()?, 1, self.padding)?;
        Ok((Some(dx), None))
    }
}

/// `conv2d(x, weight)` for a 3×3 kernel, stride 1, `padding`, by Winograd, with
/// `u = winograd::transform_weight(weight, tile)` made beforehand; f32 on the CPU only.
pub fn winograd_conv3x3(x: &Tensor, u: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        u,
        WinogradConv {
            padding,
            weight: weight.clone(),
        },
    )
}

/// A `nn.Conv2d` with square kernel, stride and padding (weights `weight` `(o, c, k, k)` and
/// `bias` `(o,)`), running [`conv2d`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    /// The Winograd transform of a 3×3 stride-1 weight that is not a training variable, made
    /// at the first forward pass that uses it (`None` inside: not applicable).
    winograd: std::sync::OnceLock<Option<Tensor>>,
    /// Whether the Winograd products run in bf16 (`true`) or f32: set by
    /// [`Conv2d::use_bf16_products`] or, as f32, by the first transform.
    bf16_products: std::sync::OnceLock<bool>,
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
            winograd: std::sync::OnceLock::new(),
            bf16_products: std::sync::OnceLock::new(),
        })
    }

    /// Makes this convolution's Winograd products run in bf16 with f32 sums (CPUs with
    /// AVX512-BF16, see [`super::bf16`]), like PyTorch's CPU autocast. It must come before the
    /// first forward pass (which fixes the weight's transform); the error says so, or names
    /// what the CPU lacks.
    pub fn use_bf16_products(&self) -> crate::Result<()> {
        if !super::bf16::available() {
            return Err(crate::Error::argument(
                "dtype",
                "bf16 (CPU)",
                "bf16 products on the CPU need AVX-512F and AVX512-BF16, which this CPU lacks",
            ));
        }
        match self.bf16_products.set(true) {
            Ok(()) => Ok(()),
            Err(_) if self.bf16_products.get() == Some(&true) => Ok(()),
            Err(_) => Err(crate::Error::argument(
                "dtype",
                "bf16 (CPU)",
                "the model has run in f32 already: ask for bf16 products before its first \
                 forward pass",
            )),
        }
    }

    /// Whether the Winograd products run in bf16; from here on, they can no longer change.
    fn bf16(&self) -> bool {
        *self.bf16_products.get_or_init(|| false)
    }

    /// The weight, `(o, c, k, k)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Conv2d {
    /// The Winograd weight when this convolution of `x` should use it ([`Self::winograd_for`]).
    fn winograd_weight(&self, x: &Tensor) -> Option<&Tensor> {
        let fits = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
        match x.dims() {
            &[b, _, h, w] if fits => self.winograd_for(b, h, w),
            _ => None,
        }
    }

    /// The Winograd weight when this convolution of `b` images of `h × w` should use it: f32
    /// on the CPU, 3×3, stride 1, a weight that training does not update (its transform is
    /// kept), and enough output for the method to pay ([`winograd::worth_it`]). The
    /// algorithm is chosen by the first input's size ([`WinogradTile::for_output`]) and kept
    /// for later ones (both are exact for any size; a sampling run keeps one batch size).
    fn winograd_for(&self, b: usize, h: usize, wi: usize) -> Option<&Tensor> {
        let w = &self.weight;
        let &[_, c_in, 3, 3] = w.dims() else {
            return None;
        };
        let fits = w.device().is_cpu()
            && w.dtype() == candle_core::DType::F32
            && self.stride == 1
            && !w.is_variable()
            && h + 2 * self.padding >= 3
            && wi + 2 * self.padding >= 3;
        if !fits {
            return None;
        }
        let tile = match self.winograd.get() {
            Some(Some(u)) => WinogradTile::from_points(u.dim(0).ok()?)?,
            Some(None) => return None,
            None => {
                let (ho, wo) = (h + 2 * self.padding - 2, wi + 2 * self.padding - 2);
                // bf16 rounding through F(4×4)'s transforms moved 20-step samples of the
                // built-in model to 20-44 dB PSNR of f32's; through F(2×2)'s, 39-64 dB.
                if self.bf16() {
                    WinogradTile::F2
                } else {
                    WinogradTile::for_output(b, c_in, ho, wo)
                }
            }
        };
        if !winograd::worth_it(&[b, c_in, h, wi], self.padding, tile) {
            return None;
        }
        self.winograd
            .get_or_init(|| match self.bf16() {
                true => winograd::transform_weight_bf16(w, tile).ok(),
                false => winograd::transform_weight(w, tile).ok(),
            })
            .as_ref()
    }

    /// Makes now what the first forward pass on `b` images of `h × w` would make on its way:
    /// the Winograd transform of the weight, where one applies (see
    /// [`crate::unet::UNet2DModel::prepare`]).
    pub fn prepare(&self, b: usize, h: usize, w: usize) {
        self.winograd_for(b, h, w);
    }

    /// The number of points of the Winograd transform this convolution keeps (16 for
    /// F(2×2, 3×3), 36 for F(4×4, 3×3)); `None` when it has none (not yet, or not applicable).
    pub fn winograd_points(&self) -> Option<usize> {
        self.winograd.get()?.as_ref()?.dim(0).ok()
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.winograd_weight(x) {
            Some(u) => winograd_conv3x3(x, u, &self.weight, self.padding)?,
            None => conv2d(x, &self.weight, self.stride, self.padding)?,
        };
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

    /// Forward and both gradients equal candle's conv2d (and its autograd), with the im2col
    /// forward and with Winograd where it applies, for the shapes a UNet uses: 3×3 stride 1
    /// pad 1, 3×3 stride 2 pad 1 / pad 0, 1×1, odd sizes, batch 1 and 5.
    #[test]
    fn matches_candle_forward_and_backward() {
        let cases = [
            (5, 3, 8, 8, 4, 3, 1, 1),
            (1, 4, 7, 9, 6, 3, 1, 1),
            (5, 4, 8, 8, 4, 3, 2, 1),
            (2, 4, 9, 9, 4, 3, 2, 0),
            (3, 6, 5, 5, 8, 1, 1, 0),
            (2, 2, 6, 6, 3, 3, 1, 0),
            (2, 40, 6, 6, 8, 1, 1, 0),
            (3, 1, 40, 40, 2, 3, 1, 1),
        ];
        let runs = cases
            .iter()
            .enumerate()
            .flat_map(|c| [(c, false), (c, true)]);
        for ((seed, &(b, c, h, w, o, k, s, p)), winograd) in runs {
            let x = Var::from_tensor(&randn(&[b, c, h, w], seed as u64, 1.0, 0.0)).unwrap();
            let wt = Var::from_tensor(&randn(&[o, c, k, k], 100 + seed as u64, 1.0, 0.0)).unwrap();
            let op = Conv2dOp {
                stride: s,
                padding: p,
                winograd,
            };
            let ours = x.apply_op2(&wt, op).unwrap();
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

    /// Every output row of every image is in exactly one tile, tiles stay within the column
    /// budget (or are one row), and several images share a tile only whole.
    #[test]
    fn tiles_cover_every_output_row_once() {
        let shapes = [
            ([16, 128, 32, 32], [128, 128, 3, 3], 1, 1),
            ([1, 256, 4, 4], [256, 256, 3, 3], 1, 1),
            ([3, 128, 256, 256], [128, 128, 3, 3], 1, 1),
            ([5, 64, 9, 9], [64, 64, 3, 3], 2, 0),
            ([7, 32, 8, 8], [16, 32, 1, 1], 1, 0),
        ];
        for (x, w, s, p) in shapes {
            let g = Geometry::new(&x, &w, s, p).unwrap();
            for (floats, threads) in [1, 100, 1 << 9, 1 << 14, 1 << 20, 1 << 30]
                .into_iter()
                .flat_map(|f| [(f, 1), (f, 2), (f, 3), (f, 16)])
            {
                let mut seen = vec![0u8; g.b * g.ho];
                let tiles = g.tiles_of(floats, threads);
                // two threads get the same number of tiles (powers of two)
                let even = (g.b * g.ho).is_power_of_two();
                assert!(
                    threads != 2 || !even || tiles.len().is_multiple_of(2),
                    "{x:?} {floats}"
                );
                for t in tiles {
                    assert!(t.images.len() == 1 || t.rows == (0..g.ho), "{t:?}");
                    assert!(
                        t.cols(&g) * g.k() <= floats.max(g.wo * g.k()),
                        "{x:?} {floats} {threads} {t:?}"
                    );
                    for i in t.images.clone() {
                        for r in t.rows.clone() {
                            seen[i * g.ho + r] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{x:?} {floats}");
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
