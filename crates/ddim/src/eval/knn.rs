//! Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991, Sec. 3): each
//! set's manifold is the union of balls around its points, each ball reaching the point's k-th
//! nearest neighbour in the same set. Precision is the share of generated points inside the real
//! manifold, recall the share of real points inside the generated one. As the paper's code
//! (`manifold_estimate`), a point on a ball's boundary is inside, and a point's own distance is
//! not one of its k neighbours.

use nalgebra::DMatrix;

use crate::{Error, Result};

/// The paper's default neighbourhood size.
pub const DEFAULT_K: usize = 3;

/// Precision and recall of a generated set against a real one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrecisionRecall {
    /// The share of generated points inside the real manifold (fidelity).
    pub precision: f64,
    /// The share of real points inside the generated manifold (coverage).
    pub recall: f64,
}

/// A set of points in a feature space: `rows.len() / dim` vectors of `dim` values.
struct Points {
    m: DMatrix<f64>, // (n, d)
    sq_norms: Vec<f64>,
}

impl Points {
    fn new(rows: &[f32], dim: usize, name: &str, k: usize) -> Result<Self> {
        if dim == 0 || !rows.len().is_multiple_of(dim) {
            return Err(Error::argument(
                name,
                format!("{} values", rows.len()),
                format!("a whole number of vectors of dim {dim} (dim at least 1)"),
            ));
        }
        let n = rows.len() / dim;
        if n <= k {
            return Err(Error::argument(
                name,
                format!("{n} points"),
                format!("more than k = {k} points, so each has k neighbours"),
            ));
        }
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(Error::argument(name, "a non-finite value", "finite values"));
        }
        let m = DMatrix::<f64>::from_fn(n, dim, |i, j| f64::from(rows[i * dim + j]));
        let sq_norms = m.row_iter().map(|r| r.norm_squared()).collect();
        Ok(Points { m, sq_norms })
    }

    fn len(&self) -> usize {
        self.m.nrows()
    }

    /// Squared distances from points `rows` of `self` to every point of `other`:
    /// `|a|² + |b|² - 2 a·b`, as one matrix product, (rows.len(), other.len()) row-major.
    fn sq_dists(&self, rows: std::ops::Range<usize>, other: &Points) -> Vec<f64> {
        let a = self.m.rows(rows.start, rows.len());
        let dots = a * other.m.transpose(); // (r, n_other)
        let mut out = Vec::with_capacity(rows.len() * other.len());
        for (r, i) in rows.enumerate() {
            for j in 0..other.len() {
                out.push((self.sq_norms[i] + other.sq_norms[j] - 2.0 * dots[(r, j)]).max(0.0));
            }
        }
        out
    }

    /// The squared distance of every point to its k-th nearest other point of the same set.
    fn sq_radii(&self, k: usize) -> Vec<f64> {
        let n = self.len();
        let mut radii = Vec::with_capacity(n);
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let d = self.sq_dists(start..end, self);
            for (r, i) in (start..end).enumerate() {
                let mut others: Vec<f64> = d[r * n..(r + 1) * n]
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &v)| v)
                    .collect();
                let (_, kth, _) = others.select_nth_unstable_by(k - 1, f64::total_cmp);
                radii.push(*kth);
            }
        }
        radii
    }

    /// The share of `self`'s points inside some ball of `manifold` (squared radii `sq_radii`).
    fn share_inside(&self, manifold: &Points, sq_radii: &[f64]) -> f64 {
        let n = self.len();
        let m = manifold.len();
        let mut inside = 0usize;
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let d = self.sq_dists(start..end, manifold);
            inside += d
                .chunks_exact(m)
                .filter(|row| row.iter().zip(sq_radii).any(|(&x, &r)| x <= r))
                .count();
        }
        inside as f64 / n as f64
    }
}

/// Rows of distances computed at once (bounds the memory to CHUNK × n values).
const CHUNK: usize = 512;

/// Precision and recall of `generated` against `real` (both `rows.len() / dim` vectors of `dim`
/// values) with k-nearest-neighbour balls. Each set needs more than `k` points. The paper
/// compares sets of equal size; radii shrink as a set grows, so compare values at one size.
///
/// ```
/// use ddim::eval::precision_recall;
///
/// // 1-d points: the real set covers 0..=9 (k = 1: every ball has radius 1); of the generated
/// // points 2.5 and 9.9 lie in it and 20 does not.
/// let real: Vec<f32> = (0..10).map(|i| i as f32).collect();
/// let pr = precision_recall(&real, &[2.5, 9.9, 20.0], 1, 1)?;
/// assert!((pr.precision - 2.0 / 3.0).abs() < 1e-12);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn precision_recall(
    real: &[f32],
    generated: &[f32],
    dim: usize,
    k: usize,
) -> Result<PrecisionRecall> {
    if k == 0 {
        return Err(Error::argument("k", 0, "at least 1 neighbour"));
    }
    let real = Points::new(real, dim, "real", k)?;
    let generated = Points::new(generated, dim, "generated", k)?;
    let real_radii = real.sq_radii(k);
    let generated_radii = generated.sq_radii(k);
    Ok(PrecisionRecall {
        precision: generated.share_inside(&real, &real_radii),
        recall: real.share_inside(&generated, &generated_radii),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(n: usize, spacing: f32, offset: (f32, f32)) -> Vec<f32> {
        let mut v = Vec::new();
        for i in 0..n {
            for j in 0..n {
                v.push(offset.0 + i as f32 * spacing);
                v.push(offset.1 + j as f32 * spacing);
            }
        }
        v
    }

    #[test]
    fn a_set_against_itself_is_perfect() {
        let pts = grid(6, 1.0, (0.0, 0.0));
        for k in [1, 3, 5] {
            let pr = precision_recall(&pts, &pts, 2, k).unwrap();
            assert_eq!((pr.precision, pr.recall), (1.0, 1.0), "k {k}");
        }
    }

    #[test]
    fn far_apart_sets_score_zero() {
        let a = grid(4, 1.0, (0.0, 0.0));
        let b = grid(4, 1.0, (100.0, 100.0));
        let pr = precision_recall(&a, &b, 2, 3).unwrap();
        assert_eq!((pr.precision, pr.recall), (0.0, 0.0));
    }

    /// Mode collapse: generated points all in one corner of the real grid are precise (inside
    /// the real manifold) but cover little of it (low recall).
    #[test]
    fn a_collapsed_generator_has_precision_but_no_recall() {
        // real: the 10×10 integer grid; with k = 3 every real radius is 1 (4-neighbours) or
        // sqrt(2) at the corners.
        let real = grid(10, 1.0, (0.0, 0.0));
        // generated: 5 points near (0, 0); their k = 3 radius is at most 0.2, so only real points
        // within 0.2 of one of them count as covered: (0, 0) alone.
        let generated = [0.0f32, 0.0, 0.1, 0.0, 0.0, 0.1, 0.1, 0.1, 0.05, 0.05];
        let pr = precision_recall(&real, &generated, 2, 3).unwrap();
        assert_eq!(pr.precision, 1.0);
        assert_eq!(pr.recall, 1.0 / 100.0);
    }

    /// Hand-counted 1-d case with both shares strictly between 0 and 1.
    #[test]
    fn hand_counted_one_dimensional_case() {
        // real 0, 1, 2, 3, 10 with k = 1: radii 1, 1, 1, 1, 7.
        let real = [0.0f32, 1.0, 2.0, 3.0, 10.0];
        // generated 1.5, 2.0, 30, 31 with k = 1: radii 0.5, 0.5, 1, 1.
        let generated = [1.5f32, 2.0, 30.0, 31.0];
        let pr = precision_recall(&real, &generated, 1, 1).unwrap();
        // 1.5 and 2.0 are within 1 of a real point; 30 and 31 are 20 and 21 from 10 (radius 7).
        assert_eq!(pr.precision, 0.5);
        // real 1 (0.5 from 1.5) and 2 (0 from 2.0; on the boundary of 1.5's ball too) are
        // covered; 0, 3 and 10 are not: 2 of 5.
        assert_eq!(pr.recall, 0.4);
        // on a boundary counts as inside: real 2.5 is exactly 0.5 from generated 2.0
        let pr = precision_recall(&[2.5f32, 50.0], &generated, 1, 1).unwrap();
        assert_eq!(pr.recall, 0.5);
    }

    /// More points than one chunk of distances, so the chunked loops are exercised.
    #[test]
    fn chunking_does_not_change_the_result() {
        let real = grid(30, 1.0, (0.0, 0.0)); // 900 points
        let generated = grid(25, 1.0, (10.0, 10.0)); // 625 points, 20×20 of them on real ones
        let pr = precision_recall(&real, &generated, 2, 3).unwrap();
        // Inside each other's manifold: the 20×20 shared points and the row and column one step
        // beyond the other grid's edge (edge radii are 1, corner radii sqrt(2)): 21×21 = 441.
        assert_eq!(pr.precision, 441.0 / 625.0);
        assert_eq!(pr.recall, 441.0 / 900.0);
    }

    #[test]
    fn bad_input_is_an_error() {
        let a = grid(3, 1.0, (0.0, 0.0));
        assert!(precision_recall(&a, &a, 2, 0).is_err());
        assert!(precision_recall(&a, &a, 2, 9).is_err()); // 9 points need k < 9
        assert!(precision_recall(&a, &a[..5], 2, 1).is_err());
        assert!(precision_recall(&a, &[f32::NAN, 0.0, 1.0, 1.0], 2, 1).is_err());
        assert!(precision_recall(&a, &a, 0, 1).is_err());
    }
}
