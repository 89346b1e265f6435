//! Sample-quality metrics that need no downloaded weights, for the DDIM paper's Table 1 on our own
//! models: the Fréchet distance of Gaussian fits in pixel space and in the features of a small
//! digit classifier trained here ([`classifier`]), k-NN precision and recall (Kynkäänniemi et
//! al. 2019) in those features, and the spread of the classes the classifier sees in the samples.
//!
//! ```
//! use ddim::eval::Evaluator;
//! use ddim::train::{Dataset, Fit};
//!
//! let real = Dataset::builtin("digits", None, Fit::Crop)?;
//! let evaluator = Evaluator::new(&real, 3)?;
//! // score 300 real images as if they were generated: they lie in the real set's manifold
//! let scores = evaluator.score(&real.data[..300 * 64], 300)?;
//! assert!(scores.fd_features.is_some() && scores.precision.unwrap() > 0.9);
//! # Ok::<(), ddim::Error>(())
//! ```

pub mod classifier;
pub mod frechet;
pub mod knn;

pub use classifier::{DigitClassifier, LoadedClassifier};
pub use frechet::{frechet_distance, FrechetReference, GaussianStats};
pub use knn::{precision_recall, PrecisionRecall, DEFAULT_K};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::train::Dataset;
use crate::{Error, Result};

/// The scores of one set of generated images against the real set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Fréchet distance in pixel space (values in [-1, 1]).
    pub fd_pixels: f64,
    /// Fréchet distance in the classifier's 128 penultimate features (built-in sets only).
    pub fd_features: Option<f64>,
    /// k-NN precision in the classifier's features.
    pub precision: Option<f64>,
    /// k-NN recall in the classifier's features.
    pub recall: Option<f64>,
    /// Entropy of the predicted classes of the samples, in bits (log2 10 ≈ 3.32 when all ten
    /// digits are equally common).
    pub class_entropy: Option<f64>,
    /// The share of samples in the most common predicted class (0.1 when balanced).
    pub top_class_share: Option<f64>,
    /// The classifier score `exp(E_x KL(p(y|x) || p(y)))` (the Inception Score's formula,
    /// Salimans et al. 2016, with the shipped digit classifier): high when each sample is
    /// clearly one digit and all digits occur; at most 10.
    pub class_score: Option<f64>,
}

/// A real set's statistics, computed once, to score many sets of generated images against.
pub struct Evaluator {
    channels: usize,
    size: usize,
    pixels: FrechetReference,
    features: Option<FeatureReference>,
    k: usize,
}

struct FeatureReference {
    classifier: LoadedClassifier,
    stats: FrechetReference,
    /// The real features in the order of a seeded permutation, so that the first n are a
    /// random subset of n for precision/recall against n generated images.
    shuffled: Vec<f32>,
    held_out_accuracy: Option<f64>,
    /// The classifier score of the real images.
    real_score: f64,
}

/// A permutation seed for the real subset of precision/recall; fixed so runs are comparable.
const SUBSET_SEED: u64 = 0x6464_696d_7072_6563; // "ddimprec"

impl Evaluator {
    /// Statistics of `real`: pixel statistics always; features, when `real` is a built-in set
    /// with a shipped classifier ([`classifier::builtin`]) at its own size. `k` is the
    /// neighbourhood size of precision/recall.
    pub fn new(real: &Dataset, k: usize) -> Result<Self> {
        if k == 0 {
            return Err(Error::argument("k", 0, "at least 1 neighbour"));
        }
        let dim = real.channels * real.size * real.size;
        let pixels = FrechetReference::new(GaussianStats::from_rows(&real.data, dim)?)?;
        let features = match classifier::builtin(&real.source)? {
            // A labelled built-in set at its own size (a folder has no labels, whatever its name).
            Some(c)
                if c.info.image_size == real.size
                    && real.channels == 1
                    && real.labels.is_some() =>
            {
                let (feats, classes, probs) =
                    c.model.features_classes_and_probabilities(&real.data)?;
                let real_score = class_score(&probs, 10);
                let held_out_accuracy = match &real.labels {
                    Some(labels) => {
                        let (held, _) = classifier::split(real.len, c.info.seed);
                        let right = held.iter().filter(|&&i| classes[i] == labels[i]).count();
                        Some(right as f64 / held.len().max(1) as f64)
                    }
                    None => None,
                };
                let stats = FrechetReference::new(GaussianStats::from_rows(
                    &feats,
                    classifier::FEATURE_DIM,
                )?)?;
                let mut rng = ChaCha8Rng::seed_from_u64(SUBSET_SEED);
                let order = permuted(&mut rng, real.len);
                let mut shuffled = Vec::with_capacity(feats.len());
                for i in order {
                    let d = classifier::FEATURE_DIM;
                    shuffled.extend_from_slice(&feats[i * d..(i + 1) * d]);
                }
                Some(FeatureReference {
                    classifier: c,
                    stats,
                    shuffled,
                    held_out_accuracy,
                    real_score,
                })
            }
            _ => None,
        };
        Ok(Evaluator {
            channels: real.channels,
            size: real.size,
            pixels,
            features,
            k,
        })
    }

    /// Whether the feature metrics are computed (a built-in set with its classifier).
    pub fn has_features(&self) -> bool {
        self.features.is_some()
    }

    /// The classifier score ([`Scores::class_score`]) of the real images.
    pub fn real_class_score(&self) -> Option<f64> {
        self.features.as_ref().map(|f| f.real_score)
    }

    /// The classifier's accuracy on the held-out real images it was not trained on.
    pub fn classifier_accuracy(&self) -> Option<f64> {
        self.features.as_ref().and_then(|f| f.held_out_accuracy)
    }

    /// Scores `n` generated images, given in model space ([-1, 1], `n × c × h × w` values in
    /// NCHW order). They are first quantised to 8 bits as a PNG would store them (as the real
    /// images are), so that both sets are compared on the same grid of values. Precision and
    /// recall compare against `min(n, real)` real images (a fixed random subset): the paper's
    /// sets are of equal size.
    pub fn score(&self, generated: &[f32], n: usize) -> Result<Scores> {
        let dim = self.channels * self.size * self.size;
        if generated.len() != n * dim {
            return Err(Error::argument(
                "generated",
                format!("{} values for {n} images", generated.len()),
                format!(
                    "{n} images of {}×{}×{} values",
                    self.channels, self.size, self.size
                ),
            ));
        }
        let quantised = generated
            .iter()
            .map(|&x| quantise(x))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| {
                Error::argument("generated", "NaN", "finite values; the sampler diverged")
            })?;
        let fd_pixels = self
            .pixels
            .distance(&GaussianStats::from_rows(&quantised, dim)?)?;
        let mut scores = Scores {
            fd_pixels,
            fd_features: None,
            precision: None,
            recall: None,
            class_entropy: None,
            top_class_share: None,
            class_score: None,
        };
        if let Some(f) = &self.features {
            let d = classifier::FEATURE_DIM;
            let (feats, classes, probs) = f
                .classifier
                .model
                .features_classes_and_probabilities(&quantised)?;
            scores.class_score = Some(class_score(&probs, 10));
            scores.fd_features = Some(f.stats.distance(&GaussianStats::from_rows(&feats, d)?)?);
            let m = n.min(f.shuffled.len() / d);
            let pr = precision_recall(&f.shuffled[..m * d], &feats, d, self.k)?;
            scores.precision = Some(pr.precision);
            scores.recall = Some(pr.recall);
            let (entropy, top) = class_spread(&classes);
            scores.class_entropy = Some(entropy);
            scores.top_class_share = Some(top);
        }
        Ok(scores)
    }
}

/// A value in model space as an 8-bit PNG stores it and reads it back: `round((x/2 + 1/2)·255)`
/// after clamping to [0, 1] (ties to even, as `image_io::to_images`), then `p/127.5 - 1`.
fn quantise(x: f32) -> Option<f32> {
    if x.is_nan() {
        return None;
    }
    let p = ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even();
    Some(p / 127.5 - 1.0)
}

/// `exp(mean_i KL(p_i || p̄))` of `n` probability rows of `k` classes, `p̄` their mean: the
/// Inception Score's formula (Salimans et al. 2016, arXiv:1606.03498). 1 when every row is the
/// same; `k` when every row is certain and the classes are equally common.
pub fn class_score(probabilities: &[f32], k: usize) -> f64 {
    let n = probabilities.len() / k.max(1);
    if n == 0 {
        return f64::NAN;
    }
    let rows = || probabilities.chunks_exact(k);
    let mut mean = vec![0f64; k];
    for row in rows() {
        for (m, &p) in mean.iter_mut().zip(row) {
            *m += f64::from(p) / n as f64;
        }
    }
    let kl: f64 = rows()
        .map(|row| {
            row.iter()
                .zip(&mean)
                .filter(|(&p, _)| p > 0.0)
                .map(|(&p, &m)| f64::from(p) * (f64::from(p).ln() - m.ln()))
                .sum::<f64>()
        })
        .sum();
    (kl / n as f64).exp()
}

/// Entropy in bits of the class histogram, and the share of its largest class.
pub fn class_spread(classes: &[u8]) -> (f64, f64) {
    let mut counts = [0usize; 256];
    for &c in classes {
        counts[c as usize] += 1;
    }
    let n = classes.len().max(1) as f64;
    let entropy = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum::<f64>();
    let top = counts.iter().copied().max().unwrap_or(0) as f64 / n;
    (entropy, top)
}

fn permuted(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    use rand::Rng;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_score_is_k_for_certain_balanced_rows_and_1_for_equal_rows() {
        let mut certain = vec![0f32; 40];
        for (i, row) in certain.chunks_exact_mut(4).enumerate() {
            row[i % 4] = 1.0;
        }
        // 10 rows over 4 classes, 3/3/2/2: exp(H(p̄)) = exp of the histogram's entropy
        let h: f64 = [0.3f64, 0.3, 0.2, 0.2].iter().map(|p| -p * p.ln()).sum();
        assert!((class_score(&certain, 4) - h.exp()).abs() < 1e-9);
        let same = [0.1f32, 0.2, 0.3, 0.4].repeat(5);
        assert!((class_score(&same, 4) - 1.0).abs() < 1e-6);
        assert!(class_score(&[], 4).is_nan());
    }
    use crate::train::Fit;

    #[test]
    fn class_spread_of_known_histograms() {
        let (h, top) = class_spread(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!((h - 10f64.log2()).abs() < 1e-12 && (top - 0.1).abs() < 1e-12);
        assert_eq!(class_spread(&[7, 7, 7, 7]), (0.0, 1.0));
        let (h, top) = class_spread(&[1, 1, 2, 3]); // p = 1/2, 1/4, 1/4: 1.5 bits
        assert!((h - 1.5).abs() < 1e-12 && top == 0.5);
    }

    #[test]
    fn quantise_matches_png_values() {
        assert_eq!(quantise(-1.5), Some(-1.0));
        assert_eq!(quantise(1.0), Some(1.0));
        assert_eq!(quantise(f32::NAN), None);
        // 0 -> 127.5 -> 128 (ties to even) -> 128/127.5 - 1
        assert_eq!(quantise(0.0), Some(128.0 / 127.5 - 1.0));
        // a real value is unchanged
        let v = 200.0 / 127.5 - 1.0;
        assert_eq!(quantise(v), Some(v));
    }

    /// Real images scored as generated are close to the real set; a blurred-out set (every
    /// image the mean image) is far, has no recall and collapses to few classes.
    #[test]
    fn real_images_score_well_and_mean_images_badly() {
        let real = Dataset::builtin("digits", None, Fit::Crop).unwrap();
        let ev = Evaluator::new(&real, 3).unwrap();
        assert!(ev.has_features());
        assert!(ev.classifier_accuracy().unwrap() >= 0.95);
        let n = 400;
        let own = ev.score(&real.data[..n * 64], n).unwrap();
        assert!(own.fd_pixels < 5.0, "{own:?}");
        assert!(own.fd_features.unwrap() < own.fd_pixels.max(1.0) * 10.0);
        // 400 real images against another 400: most of each inside the other's manifold
        assert!(
            own.precision.unwrap() > 0.8 && own.recall.unwrap() > 0.7,
            "{own:?}"
        );
        assert!(own.class_entropy.unwrap() > 3.2, "{own:?}");

        let mut mean = vec![0f32; 64];
        for img in real.data.chunks_exact(64) {
            for (m, v) in mean.iter_mut().zip(img) {
                *m += v / real.len as f32;
            }
        }
        // the mean image plus a little noise, so the covariance is not zero
        let mut noise = vec![0f32; n * 64];
        crate::rng::ImageStream::new(0, 0).fill_normal(&mut noise);
        let blurred: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, z)| mean[i % 64] + 0.05 * z)
            .collect();
        let bad = ev.score(&blurred, n).unwrap();
        assert!(bad.fd_pixels > 4.0 * own.fd_pixels, "{bad:?} vs {own:?}");
        assert!(bad.fd_features.unwrap() > 4.0 * own.fd_features.unwrap());
        assert!(bad.recall.unwrap() < 0.2, "{bad:?}");
        assert!(bad.top_class_share.unwrap() > 0.5, "{bad:?}");
    }

    #[test]
    fn folders_get_pixel_metrics_only_and_shapes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u8 {
            image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x as u8 * 30) ^ (y as u8 * i)]))
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        let real = Dataset::from_folder(dir.path(), 8, Some(1), Fit::Crop).unwrap();
        let ev = Evaluator::new(&real, 3).unwrap();
        assert!(!ev.has_features() && ev.classifier_accuracy().is_none());
        let s = ev.score(&real.data, 5).unwrap();
        assert!(s.fd_pixels < 1e-6 && s.precision.is_none(), "{s:?}");
        assert!(ev.score(&real.data, 4).is_err());
        assert!(ev.score(&vec![f32::NAN; 5 * 64], 5).is_err());
        assert!(Evaluator::new(&real, 0).is_err());
    }
}
