//! bf16 matrix products with f32 sums, for CPUs with AVX512-BF16 (`vdpbf16ps`: 16 f32 sums
//! of products of bf16 pairs per instruction, twice the multiply-adds of an f32 FMA).
//!
//! Used by the Winograd convolutions of a model when
//! [`crate::unet::UNet2DModel::use_bf16_products`] asked for it (`ddim --dtype bf16` on the
//! CPU), like PyTorch's CPU autocast: the weights and the transformed inputs are rounded
//! to bf16 (8 significant bits), every product and sum stays f32, and so does everything
//! outside the products (transforms, GroupNorm, attention, the scheduler).
//!
//! Layouts. A matrix `A` (`rows × k`, the weights) is packed once: panels of [`MR`] rows, and
//! in a panel, for each pair of columns `(2p, 2p+1)`, the [`MR`] rows' pairs as one `u32`
//! each (low half column 2p). `B` (`k × n`, f32 rows) is packed at each product into panels
//! of [`NR`] columns: for each pair of rows `(2p, 2p+1)`, the [`NR`] columns' pairs.
//! `vdpbf16ps` multiplies a broadcast `A` pair with 16 `B` pairs and adds both products to
//! 16 sums: the micro-kernel keeps `MR × NR` sums in 24 of the 32 vector registers.

use std::cell::RefCell;

/// Rows of `A` per micro-kernel (broadcast pairs).
pub const MR: usize = 12;
/// Columns of `B` per micro-kernel (two vectors of 16).
pub const NR: usize = 32;

/// Whether this CPU runs the bf16 kernel (AVX-512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x`'s bits rounded to the nearest bf16 (ties to even), in the upper 16 bits.
#[inline(always)]
fn round(x: f32) -> u32 {
    let b = x.to_bits();
    b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000
}

/// The pair `(lo, hi)` rounded to bf16, as `vdpbf16ps` reads it: `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (round(lo) >> 16) | round(hi)
}

/// `x` rounded to bf16 and back, as the products see it.
pub fn to_bf16_and_back(x: f32) -> f32 {
    f32::from_bits(round(x))
}

/// The number of `u32` values [`pack_a`] makes for a `rows × k` matrix.
pub fn packed_len(rows: usize, k: usize) -> usize {
    rows.div_ceil(MR) * MR * k.div_ceil(2)
}

/// Packs the row-major `rows × k` matrix `a` (zeros pad the last panel and an odd `k`).
pub fn pack_a(a: &[f32], rows: usize, k: usize) -> Vec<u32> {
    assert_eq!(
        a.len(),
        rows * k,
        "bf16: {} values are not {rows}x{k}",
        a.len()
    );
    let kp = k.div_ceil(2);
    let at = |r: usize, c: usize| if r < rows && c < k { a[r * k + c] } else { 0.0 };
    let mut out = Vec::with_capacity(packed_len(rows, k));
    for panel in 0..rows.div_ceil(MR) {
        for p in 0..kp {
            for i in 0..MR {
                let r = panel * MR + i;
                out.push(pair(at(r, 2 * p), at(r, 2 * p + 1)));
            }
        }
    }
    out
}

thread_local! {
    /// Each thread's packed `B`, reused by every product it runs.
    static PACKED_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `c = a · b`: `a` from [`pack_a`] of a `rows × k` matrix, `b` the `k × n` f32 matrix whose
/// row `i` starts at `b[i * ldb]`, `c` the `rows × n` output whose row `i` starts at
/// `c[i * ldc]` (overwritten).
///
/// # Panics
/// When [`available`] is false, or the slices are too short for the shapes.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[u32],
    rows: usize,
    k: usize,
    b: &[f32],
    ldb: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(available(), "bf16::matmul needs AVX512-BF16");
    assert_eq!(
        a.len(),
        packed_len(rows, k),
        "bf16: packed A has the wrong length"
    );
    if rows == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || b.len() >= (k - 1) * ldb + n, "bf16: b too short");
    assert!(c.len() >= (rows - 1) * ldc + n, "bf16: c too short");
    assert!(ldb >= n && ldc >= n, "bf16: row strides shorter than rows");
    if k == 0 {
        for row in c.chunks_mut(ldc).take(rows) {
            row[..n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let kp = k.div_ceil(2);
        PACKED_B.with(|cell| {
            let mut packed = cell.borrow_mut();
            let len = n.div_ceil(NR) * kp * NR;
            if packed.len() < len {
                packed.resize(len, 0);
            }
            // SAFETY: the CPU has the features (asserted above); the shapes were checked.
            unsafe {
                pack_b(b, ldb, k, n, &mut packed[..len]);
                for (j, bp) in packed[..len].chunks_exact(kp * NR).enumerate() {
                    let cols = NR.min(n - j * NR);
                    for (panel, ap) in a.chunks_exact(kp * MR).enumerate() {
                        let r0 = panel * MR;
                        let out = c.as_mut_ptr().add(r0 * ldc + j * NR);
                        kernel(
                            kp,
                            ap.as_ptr(),
                            bp.as_ptr(),
                            out,
                            ldc,
                            MR.min(rows - r0),
                            cols,
                        );
                    }
                }
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16: available() is false off x86-64");
}

/// Packs `b` (`k × n`, row stride `ldb`) into panels of [`NR`] columns of row pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_b(b: &[f32], ldb: usize, k: usize, n: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    for (j, panel) in out.chunks_exact_mut(kp * NR).enumerate() {
        let c0 = j * NR;
        let cols = NR.min(n - c0);
        for (p, line) in panel.chunks_exact_mut(NR).enumerate() {
            let r0 = &b[2 * p * ldb + c0..][..cols];
            if 2 * p + 1 < k {
                let r1 = &b[(2 * p + 1) * ldb + c0..][..cols];
                for ((o, &lo), &hi) in line.iter_mut().zip(r0).zip(r1) {
                    *o = pair(lo, hi);
                }
            } else {
                for (o, &lo) in line.iter_mut().zip(r0) {
                    *o = pair(lo, 0.0);
                }
            }
            line[cols..].fill(0);
        }
    }
}

/// `MR × NR` sums over `kp` pairs, stored to the first `rows × cols` of `c` (row stride `ldc`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
        let ap = a.add(p * MR);
        for (i, sums) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
            sums[0] = _mm512_dpbf16_ps(sums[0], av, b0);
            sums[1] = _mm512_dpbf16_ps(sums[1], av, b1);
        }
    }
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
    for (i, sums) in acc.iter().enumerate().take(rows) {
        let row = c.add(i * ldc);
        _mm512_mask_storeu_ps(row, m0, sums[0]);
        _mm512_mask_storeu_ps(row.add(16), m1, sums[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of the bf16-rounded matrices in f64, the reference for the kernel (which
    /// sums in f32).
    fn reference(a: &[f32], b: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let r = |x: f32| to_bf16_and_back(x) as f64;
        let mut c = vec![0f64; rows * n];
        for i in 0..rows {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| r(a[i * k + l]) * r(b[l * n + j])).sum();
            }
        }
        c
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16_and_back(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even one, 1
        assert_eq!(to_bf16_and_back(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            to_bf16_and_back(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(to_bf16_and_back(-2.5), -2.5);
        assert!((to_bf16_and_back(0.1) - 0.1).abs() < 0.1 * 2f32.powi(-8));
    }

    /// Every edge: rows not a multiple of MR, odd k, n not a multiple of NR, strides wider
    /// than the rows; the kernel's sums equal the f64 product of the rounded values to f32
    /// rounding.
    #[test]
    fn matches_the_rounded_product() {
        if !available() {
            eprintln!("this CPU has no AVX512-BF16: the bf16 kernel cannot run here");
            return;
        }
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for (rows, k, n) in [
            (12, 2, 32),
            (13, 7, 5),
            (3, 256, 70),
            (40, 129, 33),
            (1, 1, 1),
            (5, 0, 3),
        ] {
            let a: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let (ldb, ldc) = (n + 3, n + 5);
            let mut bw = vec![f32::NAN; k * ldb];
            for l in 0..k {
                bw[l * ldb..][..n].copy_from_slice(&b[l * n..][..n]);
            }
            let mut c = vec![f32::NAN; rows * ldc];
            matmul(&pack_a(&a, rows, k), rows, k, &bw, ldb, n, &mut c, ldc);
            let want = reference(&a, &b, rows, k, n);
            for i in 0..rows {
                for j in 0..n {
                    let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                    assert!(
                        (got - w).abs() <= 1e-6 * k as f64,
                        "{rows}x{k}x{n} at ({i}, {j}): {got} against {w}"
                    );
                }
                // the padding between rows is not written
                assert!(c[i * ldc + n..][..(ldc - n).min(c.len() - i * ldc - n)]
                    .iter()
                    .all(|x| x.is_nan()));
            }
        }
    }
}
