//! A small CNN digit classifier whose penultimate features are the feature space of the feature
//! Fréchet distance and of precision/recall, as Inception-v3's pool features are for FID (Heusel
//! et al. 2017), but trained here on the built-in digit sets so that nothing is downloaded.
//!
//! `conv 3×3 (1→32) → ReLU → max-pool 2 → conv 3×3 (32→64) → ReLU → max-pool 2 → conv 3×3
//! stride 2 (64→32) → ReLU → flatten → linear (→128) → ReLU = the 128 features → linear → 10
//! logits`: 104k parameters for 28×28 images (the flattened map is 32×4×4), 43k for 8×8 (32×1×1).
//! One set of weights per built-in set is shipped in `assets/` (as float16) and embedded in the
//! library; `ddim train-classifier` makes them.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ops::Conv2d;
use crate::train::Dataset;
use crate::{Error, Result};

/// The length of the feature vector ([`DigitClassifier::features`]).
pub const FEATURE_DIM: usize = 128;
/// Digits 0 to 9.
pub const NUM_CLASSES: usize = 10;
/// The share of a set held out from training to measure accuracy, in percent.
pub const HELD_OUT_PERCENT: usize = 10;

const SPLIT_SALT: u64 = 0x6464_696d_7370_6c74; // "ddimsplt"
const INIT_SALT: u64 = 0x6464_696d_636c_7369; // "ddimclsi"
const ORDER_SALT: u64 = 0x6464_696d_636c_736f; // "ddimclso"
const FORMAT: &str = "ddim-digit-classifier-v1";

const MNIST5K_WEIGHTS: &[u8] = include_bytes!("../../assets/classifier-mnist5k.safetensors");
const DIGITS_WEIGHTS: &[u8] = include_bytes!("../../assets/classifier-digits.safetensors");

/// The classifier network, for images of one size.
#[derive(Clone, Debug)]
pub struct DigitClassifier {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
    image_size: usize,
}

/// Channels of the last convolution, whose map is flattened.
const LAST_CHANNELS: usize = 32;

impl DigitClassifier {
    /// Builds the network for `image_size × image_size` grayscale images (at least 4) from `vb`
    /// (weights `conv1`, `conv2`, `conv3`, `fc1`, `fc2`).
    pub fn new(image_size: usize, vb: VarBuilder) -> Result<Self> {
        if !(4..=1024).contains(&image_size) {
            return Err(Error::argument(
                "image_size",
                image_size,
                "4 to 1024 pixels",
            ));
        }
        Ok(DigitClassifier {
            conv1: Conv2d::new(1, 32, 3, 1, 1, vb.pp("conv1"))?,
            conv2: Conv2d::new(32, 64, 3, 1, 1, vb.pp("conv2"))?,
            conv3: Conv2d::new(64, LAST_CHANNELS, 3, 2, 1, vb.pp("conv3"))?,
            fc1: candle_nn::linear(flat_len(image_size), FEATURE_DIM, vb.pp("fc1"))?,
            fc2: candle_nn::linear(FEATURE_DIM, NUM_CLASSES, vb.pp("fc2"))?,
            image_size,
        })
    }

    /// The size of the images it takes.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// The penultimate features, (b, 128), of grayscale images in model space,
    /// (b, 1, size, size).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 1 || h != self.image_size || w != self.image_size {
            return Err(Error::argument(
                "images",
                format!("shape {:?}", x.dims()),
                format!(
                    "grayscale images (b, 1, {s}, {s}), the size the classifier was made for",
                    s = self.image_size
                ),
            ));
        }
        let x = self.conv1.forward(x)?.relu()?.max_pool2d(2)?; // (b, 32, s/2, s/2)
        let x = self.conv2.forward(&x)?.relu()?.max_pool2d(2)?; // (b, 64, s/4, s/4)
        let x = self.conv3.forward(&x)?.relu()?; // (b, 32, ceil(s/8), ceil(s/8))
        Ok(self.fc1.forward(&x.reshape((b, ()))?)?.relu()?)
    }

    /// Class logits, (b, 10), from [`DigitClassifier::features`].
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(features)?)
    }

    /// Features (n × 128, row after row) and predicted classes of the `n` images given one
    /// after the other in `pixels`, in batches of 256.
    pub fn features_and_classes(&self, pixels: &[f32]) -> Result<(Vec<f32>, Vec<u8>)> {
        let (features, classes, _) = self.features_classes_and_probabilities(pixels)?;
        Ok((features, classes))
    }

    /// [`DigitClassifier::features_and_classes`], and the class probabilities (softmax of the
    /// logits; n × 10, row after row).
    pub fn features_classes_and_probabilities(
        &self,
        pixels: &[f32],
    ) -> Result<(Vec<f32>, Vec<u8>, Vec<f32>)> {
        let size = self.image_size;
        let per = size * size;
        if !pixels.len().is_multiple_of(per) {
            return Err(Error::argument(
                "pixels",
                format!("{} values", pixels.len()),
                format!("whole {size}×{size} grayscale images"),
            ));
        }
        let mut features = Vec::with_capacity(pixels.len() / per * FEATURE_DIM);
        let mut classes = Vec::with_capacity(pixels.len() / per);
        let mut probabilities = Vec::with_capacity(pixels.len() / per * 10);
        for chunk in pixels.chunks(256 * per) {
            let b = chunk.len() / per;
            let x = Tensor::from_slice(chunk, (b, 1, size, size), &Device::Cpu)?;
            let f = self.features(&x)?;
            let logits = self.logits(&f)?;
            let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
            let p = candle_nn::ops::softmax_last_dim(&logits)?;
            probabilities.extend(p.flatten_all()?.to_vec1::<f32>()?);
            features.extend(f.flatten_all()?.to_vec1::<f32>()?);
            classes.extend(predicted.into_iter().map(|c| c as u8));
        }
        Ok((features, classes, probabilities))
    }
}

/// The flattened length of the last map: 32 · o², o the output side of the stride-2, padding-1
/// 3×3 convolution on the (s/4)×(s/4) map (4 for 28×28 images, 1 for 8×8).
fn flat_len(image_size: usize) -> usize {
    let m = image_size / 4; // after two 2×2 max-pools (floor)
    let o = (m + 2 - 3) / 2 + 1;
    LAST_CHANNELS * o * o
}

/// What the metadata of a classifier file says about how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierInfo {
    /// The built-in set it was trained on.
    pub dataset: String,
    /// Its images' size.
    pub image_size: usize,
    /// The seed of the weights, the split and the batches.
    pub seed: u64,
    /// Training epochs.
    pub epochs: usize,
    /// Accuracy on the held-out images of [`split`] with this seed (float16 weights).
    pub held_out_accuracy: f64,
}

/// A classifier with its description.
#[derive(Clone, Debug)]
pub struct LoadedClassifier {
    /// The network.
    pub model: DigitClassifier,
    /// How it was made.
    pub info: ClassifierInfo,
}

/// The shipped classifier of a built-in set (`digits`, `mnist5k`); `None` for other names.
pub fn builtin(dataset: &str) -> Result<Option<LoadedClassifier>> {
    let bytes = match dataset {
        "digits" => DIGITS_WEIGHTS,
        "mnist5k" => MNIST5K_WEIGHTS,
        _ => return Ok(None),
    };
    from_bytes(bytes).map(Some)
}

/// Reads a classifier file (safetensors with [`ClassifierInfo`] in its metadata).
pub fn from_bytes(bytes: &[u8]) -> Result<LoadedClassifier> {
    let bad = |reason: String| Error::argument("classifier weights", "the file", reason);
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("a safetensors file ({e})")))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("metadata describing the classifier".into()))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("metadata with format = {FORMAT}")));
    }
    let field = |key: &str| {
        meta.get(key)
            .ok_or_else(|| bad(format!("the metadata key `{key}`")))
    };
    let number = |key: &str| -> Result<f64> {
        field(key)?
            .parse::<f64>()
            .map_err(|_| bad(format!("a number in the metadata key `{key}`")))
    };
    let info = ClassifierInfo {
        dataset: field("dataset")?.clone(),
        image_size: number("image_size")? as usize,
        seed: field("seed")?
            .parse()
            .map_err(|_| bad("a whole number in `seed`".into()))?,
        epochs: number("epochs")? as usize,
        held_out_accuracy: number("held_out_accuracy")?,
    };
    let vb = VarBuilder::from_buffered_safetensors(bytes.to_vec(), DType::F32, &Device::Cpu)?;
    Ok(LoadedClassifier {
        model: DigitClassifier::new(info.image_size, vb)?,
        info,
    })
}

/// The held-out images of a set of `len` (the first `len · 10 / 100` of a permutation seeded by
/// `seed`) and the training images (the rest), each in increasing order.
pub fn split(len: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SPLIT_SALT);
    let order = permutation(&mut rng, len);
    let held = len * HELD_OUT_PERCENT / 100;
    let mut held_out = order[..held].to_vec();
    let mut train = order[held..].to_vec();
    held_out.sort_unstable();
    train.sort_unstable();
    (held_out, train)
}

fn permutation(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// How [`train`] trains.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierTrainConfig {
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW's peak learning rate (cosine decay to 0 over the run).
    pub lr: f64,
    /// AdamW's weight decay.
    pub weight_decay: f64,
    /// Training images are shifted by up to this many pixels in x and y (0: no augmentation).
    pub max_shift: usize,
    /// Seeds the weights, the held-out split, the batches and the shifts.
    pub seed: u64,
}

impl ClassifierTrainConfig {
    /// 20 epochs of batches of 64, lr 2e-3, weight decay 1e-4, shifts of up to `size / 14`
    /// pixels (2 for 28×28 MNIST, none for 8×8 digits), seed 0.
    pub fn for_size(size: usize) -> Self {
        ClassifierTrainConfig {
            epochs: 20,
            batch_size: 64,
            lr: 2e-3,
            weight_decay: 1e-4,
            max_shift: size / 14,
            seed: 0,
        }
    }
}

/// A trained classifier.
pub struct TrainedClassifier {
    /// The network, with the float16-rounded weights that [`save`] writes.
    pub model: DigitClassifier,
    /// How it was made and its held-out accuracy.
    pub info: ClassifierInfo,
    /// The weights by name, float16.
    tensors: HashMap<String, Tensor>,
}

/// What [`train`] reports after each epoch.
#[derive(Clone, Copy, Debug)]
pub struct EpochStats {
    /// The epoch just finished, from 1.
    pub epoch: usize,
    /// The mean cross-entropy of its batches.
    pub loss: f64,
    /// The accuracy on the held-out images.
    pub held_out_accuracy: f64,
}

/// Trains a classifier on a labelled grayscale set, holding out [`HELD_OUT_PERCENT`] % of it
/// ([`split`]) to measure accuracy. Deterministic: the same data, config and machine give the
/// same weights.
pub fn train(
    data: &Dataset,
    config: &ClassifierTrainConfig,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<TrainedClassifier> {
    let labels = data.labels.as_ref().ok_or_else(|| {
        Error::argument(
            "data",
            &data.source,
            "a labelled set: the built-in digits or mnist5k",
        )
    })?;
    if data.channels != 1 {
        return Err(Error::argument(
            "data",
            &data.source,
            "grayscale images (1 channel)",
        ));
    }
    if config.epochs == 0 || config.batch_size == 0 {
        return Err(Error::argument(
            "epochs / batch-size",
            format!("{} / {}", config.epochs, config.batch_size),
            "at least 1 each",
        ));
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(Error::argument("lr", config.lr, "a positive number"));
    }
    if config.max_shift >= data.size / 2 {
        return Err(Error::argument(
            "max-shift",
            config.max_shift,
            format!("less than half the image size {}", data.size),
        ));
    }
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let model = DigitClassifier::new(
        data.size,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let vars = init_vars(&varmap, config.seed)?;
    let (held_out, train_idx) = split(data.len, config.seed);
    if train_idx.is_empty() || held_out.is_empty() {
        return Err(Error::argument(
            "data",
            format!("{} images", data.len),
            "at least 10 images, to hold some out",
        ));
    }

    let mut opt = candle_nn::AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        candle_nn::ParamsAdamW {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let steps_per_epoch = train_idx.len().div_ceil(config.batch_size);
    let total = (steps_per_epoch * config.epochs) as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ ORDER_SALT);
    let per = data.size * data.size;
    let mut step = 0usize;
    for epoch in 1..=config.epochs {
        let order = permutation(&mut rng, train_idx.len());
        let mut loss_sum = 0f64;
        for batch in order.chunks(config.batch_size) {
            let mut pixels = Vec::with_capacity(batch.len() * per);
            let mut targets = Vec::with_capacity(batch.len());
            for &o in batch {
                let i = train_idx[o];
                let s = config.max_shift as i64;
                let (dx, dy) = if s > 0 {
                    (rng.random_range(-s..=s), rng.random_range(-s..=s))
                } else {
                    (0, 0)
                };
                shifted(data.image(i), data.size, dx, dy, &mut pixels);
                targets.push(u32::from(labels[i]));
            }
            let x = Tensor::from_vec(pixels, (batch.len(), 1, data.size, data.size), &device)?;
            let y = Tensor::from_vec(targets, batch.len(), &device)?;
            let logits = model.logits(&model.features(&x)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(Error::Diverged {
                    step: step as u64 + 1,
                    what: format!("classifier loss {value}"),
                });
            }
            loss_sum += f64::from(value);
            // cosine decay from the peak to 0
            let progress = step as f64 / total;
            opt.set_learning_rate(
                config.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            );
            opt.backward_step(&loss)?;
            step += 1;
        }
        let acc = accuracy(&model, data, &held_out)?;
        on_epoch(&EpochStats {
            epoch,
            loss: loss_sum / steps_per_epoch as f64,
            held_out_accuracy: acc,
        });
    }

    // Ship float16 weights: round, and measure the accuracy of what is shipped.
    let mut tensors = HashMap::new();
    for (name, var) in &vars {
        let half = var.as_tensor().to_dtype(DType::F16)?;
        var.set(&half.to_dtype(DType::F32)?)?;
        tensors.insert(name.clone(), half);
    }
    let held_out_accuracy = accuracy(&model, data, &held_out)?;
    Ok(TrainedClassifier {
        model,
        info: ClassifierInfo {
            dataset: data.source.clone(),
            image_size: data.size,
            seed: config.seed,
            epochs: config.epochs,
            held_out_accuracy,
        },
        tensors,
    })
}

impl TrainedClassifier {
    /// The weights as a safetensors file (float16, tensors in name order) with
    /// [`ClassifierInfo`] in its metadata. Written by hand rather than with
    /// `safetensors::serialize`, whose metadata is a `HashMap` in random order, so that the
    /// same weights always give the same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let info = &self.info;
        let mut header = serde_json::Map::new();
        let metadata: serde_json::Map<String, serde_json::Value> = [
            ("format", FORMAT.to_string()),
            ("dataset", info.dataset.clone()),
            ("image_size", info.image_size.to_string()),
            ("seed", info.seed.to_string()),
            ("epochs", info.epochs.to_string()),
            (
                "held_out_accuracy",
                format!("{:.6}", info.held_out_accuracy),
            ),
            (
                "held_out",
                format!(
                    "ddim::eval::classifier::split(len, {}): {HELD_OUT_PERCENT}% of the set",
                    info.seed
                ),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
        .collect();
        header.insert("__metadata__".into(), metadata.into());
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut data = Vec::new();
        for name in names {
            let t = &self.tensors[name];
            let start = data.len();
            // candle's safetensors view: the values as little-endian bytes
            data.extend_from_slice(&safetensors::View::data(t));
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": "F16",
                    "shape": t.dims(),
                    "data_offsets": [start, data.len()],
                }),
            );
        }
        let mut json = serde_json::Value::Object(header).to_string().into_bytes();
        // The data starts 8-byte aligned, the header padded with spaces as safetensors does.
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + data.len());
        out.extend((json.len() as u64).to_le_bytes());
        out.extend(json);
        out.extend(data);
        Ok(out)
    }

    /// Writes [`TrainedClassifier::to_bytes`] to `path` atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::atomic::write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
    }
}

/// The share of `indices` of `data` that the classifier labels correctly.
pub fn accuracy(model: &DigitClassifier, data: &Dataset, indices: &[usize]) -> Result<f64> {
    let labels = data
        .labels
        .as_ref()
        .ok_or_else(|| Error::argument("data", &data.source, "a labelled set"))?;
    if indices.is_empty() {
        return Ok(0.0);
    }
    let mut pixels = Vec::with_capacity(indices.len() * data.size * data.size);
    for &i in indices {
        pixels.extend_from_slice(data.image(i));
    }
    let (_, predicted) = model.features_and_classes(&pixels)?;
    let right = indices
        .iter()
        .zip(&predicted)
        .filter(|(&i, &p)| labels[i] == p)
        .count();
    Ok(right as f64 / indices.len() as f64)
}

/// Appends `img` (size × size) moved by (dx, dy) pixels, the uncovered border black (-1).
fn shifted(img: &[f32], size: usize, dx: i64, dy: i64, out: &mut Vec<f32>) {
    let s = size as i64;
    for y in 0..s {
        for x in 0..s {
            let (sx, sy) = (x - dx, y - dy);
            out.push(if (0..s).contains(&sx) && (0..s).contains(&sy) {
                img[(sy * s + sx) as usize]
            } else {
                -1.0
            });
        }
    }
}

/// Sets every variable, in name order, to PyTorch's default initialisation drawn from `seed`:
/// U(±1/sqrt(fan_in)) for weights and biases.
fn init_vars(varmap: &VarMap, seed: u64) -> Result<Vec<(String, Var)>> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::argument("classifier", "variables", "an unpoisoned lock"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ INIT_SALT);
    let shapes: HashMap<String, Vec<usize>> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    for (name, var) in &vars {
        let weight = format!("{}.weight", name.rsplit_once('.').map_or("", |p| p.0));
        let fan_in: usize = shapes
            .get(&weight)
            .map_or(1, |s| s[1..].iter().product::<usize>().max(1));
        let bound = 1.0 / (fan_in as f64).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu)?)?;
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Fit;

    #[test]
    fn split_is_deterministic_disjoint_and_a_tenth() {
        let (held, train) = split(1797, 0);
        assert_eq!(held.len(), 179);
        assert_eq!(held.len() + train.len(), 1797);
        assert!(held.iter().all(|i| train.binary_search(i).is_err()));
        assert_eq!(split(1797, 0), (held.clone(), train));
        assert_ne!(split(1797, 1).0, held);
    }

    #[test]
    fn shifting_moves_pixels_and_fills_black() {
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let mut out = Vec::new();
        shifted(&img, 4, 1, 0, &mut out);
        assert_eq!(&out[..4], &[-1.0, 0.0, 1.0, 2.0]);
        out.clear();
        shifted(&img, 4, 0, -1, &mut out);
        assert_eq!(&out[..4], &[4.0, 5.0, 6.0, 7.0]);
        assert_eq!(&out[12..], &[-1.0; 4]);
    }

    /// The same seed gives the same weights; the loss falls.
    #[test]
    fn training_is_deterministic() {
        let mut data = Dataset::builtin("digits", None, Fit::Crop).unwrap();
        data.len = 200;
        data.data.truncate(200 * 64);
        if let Some(l) = data.labels.as_mut() {
            l.truncate(200);
        }
        let config = ClassifierTrainConfig {
            epochs: 2,
            ..ClassifierTrainConfig::for_size(8)
        };
        let mut losses = Vec::new();
        let a = train(&data, &config, &mut |s| losses.push(s.loss)).unwrap();
        let mut again = Vec::new();
        let b = train(&data, &config, &mut |s| again.push(s.loss)).unwrap();
        assert_eq!(losses, again);
        // byte for byte, metadata included
        assert!(a.to_bytes().unwrap() == b.to_bytes().unwrap());
        assert!(losses[1] < losses[0], "{losses:?}");
        let c = train(
            &data,
            &ClassifierTrainConfig { seed: 1, ..config },
            &mut |_| {},
        )
        .unwrap();
        assert!(a.to_bytes().unwrap() != c.to_bytes().unwrap());
        // a file round-trips with its description
        let loaded = from_bytes(&a.to_bytes().unwrap()).unwrap();
        assert_eq!(loaded.info, a.info);
    }

    /// The shipped weights load, describe themselves, and reach the accuracy their files state
    /// on the held-out images (a regression test for the assets and the split): at least 95% on
    /// the 8×8 digits and 97% on MNIST.
    #[test]
    fn shipped_classifiers_reach_their_stated_accuracy() {
        for (name, size, floor) in [("digits", 8, 0.95), ("mnist5k", 28, 0.97)] {
            let c = builtin(name).unwrap().unwrap();
            assert_eq!((c.info.dataset.as_str(), c.info.image_size), (name, size));
            let data = Dataset::builtin(name, None, Fit::Crop).unwrap();
            let (held, _) = split(data.len, c.info.seed);
            let acc = accuracy(&c.model, &data, &held).unwrap();
            assert!(
                (acc - c.info.held_out_accuracy).abs() < 1e-6,
                "{name}: {acc}"
            );
            assert!(acc >= floor, "{name}: {acc}");
        }
        assert!(builtin("cifar10").unwrap().is_none());
        assert!(from_bytes(b"not a safetensors file").is_err());
        // training needs labels
        let mut data = Dataset::builtin("digits", None, Fit::Crop).unwrap();
        data.labels = None;
        assert!(train(&data, &ClassifierTrainConfig::for_size(8), &mut |_| {}).is_err());
    }
}
