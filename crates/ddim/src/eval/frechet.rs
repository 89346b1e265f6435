//! The Fréchet distance between two Gaussians fitted to sets of vectors (Dowson & Landau 1982;
//! the FID of Heusel et al. 2017, arXiv:1706.08500, on other features):
//! `FD = |μ1 - μ2|² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^{1/2}`, with the last trace computed as
//! `tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}` from two symmetric eigendecompositions, which stays real and
//! stable where pytorch-fid's `scipy.linalg.sqrtm(Σ1 Σ2)` needs its complex-part workaround.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::{Error, Result};

/// The largest dimension fitted: a 4096 × 4096 covariance takes 128 MiB and its
/// eigendecomposition minutes; 28×28 images have 784 values, 32×32 RGB images 3072.
pub const MAX_DIM: usize = 4096;

/// The mean and covariance of a set of `count` vectors of `dim` values (covariance normalised by
/// `count - 1`, as `numpy.cov`), in f64.
#[derive(Clone, Debug)]
pub struct GaussianStats {
    /// μ, `dim` values.
    pub mean: DVector<f64>,
    /// Σ, `dim × dim`.
    pub cov: DMatrix<f64>,
    /// How many vectors were fitted (0 for statistics given directly).
    pub count: usize,
}

impl GaussianStats {
    /// Fits a Gaussian to `rows`: `rows.len() / dim` vectors of `dim` values, one after the other.
    /// Needs at least two vectors and finite values.
    pub fn from_rows(rows: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || !rows.len().is_multiple_of(dim) {
            return Err(Error::argument(
                "rows",
                format!("{} values", rows.len()),
                format!("a whole number of vectors of dim {dim} (dim at least 1)"),
            ));
        }
        if dim > MAX_DIM {
            return Err(Error::argument(
                "dim",
                dim,
                format!("at most {MAX_DIM} values per vector (a dim × dim covariance is fitted)"),
            ));
        }
        let n = rows.len() / dim;
        if n < 2 {
            return Err(Error::argument(
                "rows",
                format!("{n} vector(s)"),
                "at least 2 vectors to fit a covariance",
            ));
        }
        if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
            return Err(Error::argument(
                "rows",
                format!("{} at vector {}, value {}", rows[i], i / dim, i % dim),
                "finite values",
            ));
        }
        let mut mean = DVector::<f64>::zeros(dim);
        for row in rows.chunks_exact(dim) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += f64::from(v);
            }
        }
        mean /= n as f64;
        // (n, d) centred, then Σ = Xᵀ X / (n - 1); `transpose() *` runs matrixmultiply's GEMM.
        let centred =
            DMatrix::<f64>::from_fn(n, dim, |i, j| f64::from(rows[i * dim + j]) - mean[j]);
        let mut cov = centred.transpose() * &centred;
        cov /= (n - 1) as f64;
        Ok(GaussianStats {
            mean,
            cov,
            count: n,
        })
    }

    /// Statistics given directly: `mean` (d values) and `cov` (d × d, row-major, symmetric).
    pub fn new(mean: &[f64], cov: &[f64]) -> Result<Self> {
        let d = mean.len();
        if d == 0 || d > MAX_DIM || cov.len() != d * d {
            return Err(Error::argument(
                "cov",
                format!("{} values for a mean of {d}", cov.len()),
                format!("a d × d matrix for a mean of 1 ≤ d ≤ {MAX_DIM} values"),
            ));
        }
        if mean.iter().chain(cov).any(|v| !v.is_finite()) {
            return Err(Error::argument(
                "cov",
                "a non-finite value",
                "finite values",
            ));
        }
        Ok(GaussianStats {
            mean: DVector::from_column_slice(mean),
            cov: DMatrix::from_row_slice(d, d, cov),
            count: 0,
        })
    }

    /// The dimension d.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// A reference set's statistics with Σ^{1/2} precomputed, for the distance of many sets to one
/// reference (the real images) at the cost of one matrix product pair and one eigenvalue pass each.
#[derive(Clone, Debug)]
pub struct FrechetReference {
    stats: GaussianStats,
    sqrt_cov: DMatrix<f64>,
    trace: f64,
}

impl FrechetReference {
    /// Precomputes Σ^{1/2} of `stats` (negative eigenvalues from rounding are taken as 0).
    pub fn new(stats: GaussianStats) -> Result<Self> {
        let sqrt_cov = sqrt_psd(&stats.cov)?;
        let trace = stats.cov.trace();
        Ok(FrechetReference {
            stats,
            sqrt_cov,
            trace,
        })
    }

    /// The reference's statistics.
    pub fn stats(&self) -> &GaussianStats {
        &self.stats
    }

    /// The Fréchet distance between the reference and `other` (same dimension).
    pub fn distance(&self, other: &GaussianStats) -> Result<f64> {
        let d = self.stats.dim();
        if other.dim() != d {
            return Err(Error::argument(
                "stats",
                format!("dimension {}", other.dim()),
                format!("the reference's dimension {d}"),
            ));
        }
        let diff = &self.stats.mean - &other.mean;
        // tr (Σ1 Σ2)^{1/2} = tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: the same eigenvalues, but of a
        // symmetric positive semi-definite matrix, so the square roots are real.
        let m = &self.sqrt_cov * &other.cov * &self.sqrt_cov;
        let m = (&m + m.transpose()) * 0.5;
        let tr_sqrt: f64 = eigenvalues(m)?.iter().map(|&l| l.max(0.0).sqrt()).sum();
        let fd = diff.norm_squared() + self.trace + other.cov.trace() - 2.0 * tr_sqrt;
        // FD ≥ 0; a value just below 0 is rounding (identical sets).
        Ok(fd.max(0.0))
    }
}

/// The Fréchet distance between Gaussians `a` and `b` of the same dimension.
///
/// ```
/// use ddim::eval::{frechet_distance, GaussianStats};
///
/// // N((0, 0), I) and N((3, 4), 4I): |μ1-μ2|² = 25, tr Σ1 + tr Σ2 - 2 tr (Σ1Σ2)^{1/2} = 2 + 8 - 8
/// let a = GaussianStats::new(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0])?;
/// let b = GaussianStats::new(&[3.0, 4.0], &[4.0, 0.0, 0.0, 4.0])?;
/// assert!((frechet_distance(&a, &b)? - 27.0).abs() < 1e-9);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    FrechetReference::new(a.clone())?.distance(b)
}

fn eigen(m: DMatrix<f64>) -> Result<SymmetricEigen<f64, nalgebra::Dyn>> {
    let n = m.nrows();
    // A bounded number of QR sweeps, so that no input can make this loop for ever.
    SymmetricEigen::try_new(m, 1e-14, 100 * n.max(10)).ok_or_else(|| {
        Error::argument(
            "covariance",
            format!("a {n}×{n} matrix"),
            "a symmetric matrix whose eigendecomposition converges",
        )
    })
}

fn eigenvalues(m: DMatrix<f64>) -> Result<DVector<f64>> {
    Ok(eigen(m)?.eigenvalues)
}

/// V diag(sqrt(max(λ, 0))) Vᵀ for a symmetric positive semi-definite matrix.
fn sqrt_psd(m: &DMatrix<f64>) -> Result<DMatrix<f64>> {
    let e = eigen(m.clone())?;
    let mut scaled = e.eigenvectors.clone();
    for (j, mut col) in scaled.column_iter_mut().enumerate() {
        col *= e.eigenvalues[j].max(0.0).sqrt();
    }
    Ok(scaled * e.eigenvectors.transpose())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn gaussian_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; n * d];
        crate::rng::ImageStream::new(seed, 0).fill_normal(&mut v);
        v
    }

    #[test]
    fn identical_sets_are_at_distance_zero() {
        let rows = gaussian_rows(300, 20, 1);
        let a = GaussianStats::from_rows(&rows, 20).unwrap();
        let fd = frechet_distance(&a, &a).unwrap();
        assert!(fd.abs() < 1e-9, "{fd}");
        // a shifted copy: only the mean term remains, |(0.5, ..., 0.5)|² = 20 · 0.25
        let shifted: Vec<f32> = rows.iter().map(|v| v + 0.5).collect();
        let b = GaussianStats::from_rows(&shifted, 20).unwrap();
        let fd = frechet_distance(&a, &b).unwrap();
        assert!((fd - 5.0).abs() < 1e-4, "{fd}");
    }

    /// Two Gaussians with commuting covariances (diagonal in the same rotated basis): then
    /// tr (Σ1Σ2)^{1/2} = Σ_i sqrt(a_i b_i), so FD = |μ1-μ2|² + Σ_i (sqrt(a_i) - sqrt(b_i))².
    #[test]
    fn closed_form_for_commuting_covariances() {
        let d = 6;
        // a rotation: the eigenvectors of a random symmetric matrix
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let r = DMatrix::<f64>::from_fn(d, d, |_, _| rng.random_range(-1.0..1.0));
        let q = SymmetricEigen::new(&r + r.transpose()).eigenvectors;
        let a_eig = [0.1, 0.5, 1.0, 2.0, 3.0, 9.0];
        let b_eig = [4.0, 0.5, 0.25, 2.0, 0.0, 1.0];
        let cov = |e: &[f64]| {
            let m = &q * DMatrix::from_diagonal(&DVector::from_column_slice(e)) * q.transpose();
            m.transpose().as_slice().to_vec() // row-major
        };
        let mu1 = [1.0, 2.0, 3.0, 0.0, 0.0, -1.0];
        let mu2 = [0.0, 2.0, 1.0, 0.5, 0.0, -1.0];
        let a = GaussianStats::new(&mu1, &cov(&a_eig)).unwrap();
        let b = GaussianStats::new(&mu2, &cov(&b_eig)).unwrap();
        let mean_term: f64 = mu1.iter().zip(&mu2).map(|(x, y)| (x - y) * (x - y)).sum();
        let cov_term: f64 = a_eig
            .iter()
            .zip(&b_eig)
            .map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2))
            .sum();
        let expected = mean_term + cov_term;
        for fd in [
            frechet_distance(&a, &b).unwrap(),
            frechet_distance(&b, &a).unwrap(),
        ] {
            assert!((fd - expected).abs() < 1e-9, "{fd} vs {expected}");
        }
    }

    /// Non-commuting covariances against scipy: fixed matrices, and two sets of rows made by a
    /// formula, so that the expected values depend on no random generator.
    ///
    /// ```python
    /// import numpy as np, scipy.linalg
    /// s1 = np.array([[2.0, 0.3, -0.5], [0.3, 1.0, 0.2], [-0.5, 0.2, 0.7]])
    /// s2 = np.array([[0.5, -0.2, 0.1], [-0.2, 3.0, 0.9], [0.1, 0.9, 1.2]])
    /// m1 = np.array([0.1, -0.4, 2.0]); m2 = np.array([0.3, 0.3, 1.0])
    /// covmean = scipy.linalg.sqrtm(s1 @ s2).real
    /// print(repr(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))
    ///
    /// def fd(a, b):  # pytorch-fid's calculate_frechet_distance on np.cov statistics
    ///     m1, m2 = a.mean(0), b.mean(0)
    ///     s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ///     covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ///     return ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    /// i = np.arange(50)[:, None]; j = np.arange(5)[None, :]
    /// a = (np.sin(0.37 * i + 1.3 * j) + 0.1 * j).astype(np.float32).astype(np.float64)
    /// b = (np.cos(0.21 * i * (j + 1)) * 0.8 + 0.05 * i / 50).astype(np.float32).astype(np.float64)
    /// print(repr(fd(a, b)))
    /// ```
    /// (numpy 2.4.6, scipy 1.17.1)
    #[test]
    fn matches_scipy_sqrtm() {
        let s1 = [2.0, 0.3, -0.5, 0.3, 1.0, 0.2, -0.5, 0.2, 0.7];
        let s2 = [0.5, -0.2, 0.1, -0.2, 3.0, 0.9, 0.1, 0.9, 1.2];
        let a = GaussianStats::new(&[0.1, -0.4, 2.0], &s1).unwrap();
        let b = GaussianStats::new(&[0.3, 0.3, 1.0], &s2).unwrap();
        let fd = frechet_distance(&a, &b).unwrap();
        assert!((fd - 2.966_601_049_314_429_7).abs() < 1e-9, "{fd}");

        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..50 {
            for j in 0..5 {
                let (i, j) = (f64::from(i), f64::from(j));
                a.push(((0.37 * i + 1.3 * j).sin() + 0.1 * j) as f32);
                b.push(((0.21 * i * (j + 1.0)).cos() * 0.8 + 0.05 * i / 50.0) as f32);
            }
        }
        let a = GaussianStats::from_rows(&a, 5).unwrap();
        let b = GaussianStats::from_rows(&b, 5).unwrap();
        let fd = frechet_distance(&a, &b).unwrap();
        // f32 rows: a sine that rounds to the other neighbouring f32 moves the result by ~1e-9
        assert!((fd - 1.978_836_470_473_644_7).abs() < 1e-7, "{fd}");
    }

    /// The statistics of sampled rows equal numpy's `mean(0)` and `cov(rowvar=False)`.
    #[test]
    fn fitted_statistics_match_numpy_conventions() {
        // rows (1, 2), (3, 6), (5, 7): mean (3, 5), cov [[4, 5], [5, 7]] (n - 1 = 2)
        let s = GaussianStats::from_rows(&[1.0, 2.0, 3.0, 6.0, 5.0, 7.0], 2).unwrap();
        assert_eq!(s.mean.as_slice(), &[3.0, 5.0]);
        assert_eq!(s.cov.as_slice(), &[4.0, 5.0, 5.0, 7.0]);
        assert_eq!(s.count, 3);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(GaussianStats::from_rows(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(GaussianStats::from_rows(&[1.0, 2.0], 2).is_err());
        assert!(GaussianStats::from_rows(&[1.0, 2.0, f32::NAN, 1.0], 2).is_err());
        assert!(GaussianStats::from_rows(&[], 0).is_err());
        assert!(GaussianStats::from_rows(&vec![0.0; 2 * (MAX_DIM + 1)], MAX_DIM + 1).is_err());
        assert!(GaussianStats::new(&[0.0], &[1.0, 0.0]).is_err());
        let a = GaussianStats::new(&[0.0], &[1.0]).unwrap();
        let b = GaussianStats::new(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0]).unwrap();
        assert!(frechet_distance(&a, &b).is_err());
    }

    /// A larger case against the closed form: two fits of N(0, I) in 150 dimensions from
    /// 400 draws each are close (the sampling error only), a scaled copy far.
    #[test]
    fn larger_dimension() {
        let d = 150;
        let rows = gaussian_rows(400, d, 3);
        let a = FrechetReference::new(GaussianStats::from_rows(&rows, d).unwrap()).unwrap();
        let b = GaussianStats::from_rows(&gaussian_rows(400, d, 4), d).unwrap();
        let near = a.distance(&b).unwrap();
        assert!(near > 1.0 && near < 0.5 * d as f64, "{near}");
        // x -> 3x: μ -> 3μ and Σ -> 9Σ, so FD = |2μ|² + tr Σ + 9 tr Σ - 2·3 tr Σ
        // = 4 |μ|² + 4 tr Σ (commuting covariances)
        let scaled: Vec<f32> = rows.iter().map(|v| 3.0 * v).collect();
        let c = GaussianStats::from_rows(&scaled, d).unwrap();
        let expected = 4.0 * (a.stats().mean.norm_squared() + a.stats().cov.trace());
        let fd = a.distance(&c).unwrap();
        assert!(
            (fd - expected).abs() < 1e-6 * expected,
            "{fd} vs {expected}"
        );
    }

    /// 784-dimensional pixel statistics (28×28) of 1,000 vectors take seconds. Timed in release
    /// builds only: nalgebra's generic code is compiled with our crate's optimisation level, so
    /// an unoptimised test build takes minutes.
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "minutes in an unoptimised build: run with cargo test --release"
    )]
    fn pixel_space_dimension_stays_accurate() {
        // MNIST's 784 pixels with 1,000 samples: the distance of a set to itself is zero and the
        // distance between two draws of one Gaussian is small and positive (finite-sample bias).
        let d = 784;
        let a = GaussianStats::from_rows(&gaussian_rows(1000, d, 3), d).unwrap();
        let b = GaussianStats::from_rows(&gaussian_rows(1000, d, 4), d).unwrap();
        let reference = FrechetReference::new(a.clone()).unwrap();
        let itself = reference.distance(&a).unwrap();
        assert!(itself.abs() < 1e-6 * d as f64, "{itself}");
        let fd = reference.distance(&b).unwrap();
        assert!(fd > 1.0 && fd < 400.0, "{fd}");
    }
}
