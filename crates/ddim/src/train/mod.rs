//! Training with the DDPM objective (Ho et al. 2020, Algorithm 1): draw x_0 from the data, t
//! uniformly from the training timesteps and ε ~ N(0, I), noise x_0 to x_t with the scheduler's
//! `add_noise`, and regress the UNet's output on ε (or on v, or on x_0) with the mean squared
//! error; AdamW, warmup, gradient-norm clipping and an EMA of the weights, as diffusers'
//! `examples/unconditional_image_generation/train_unconditional.py` does.
//!
//! Every random choice of step `s` (the images of the batch, their flips, t and ε) is a function
//! of the seed and `s` alone, so a run resumed from a checkpoint continues exactly as the
//! uninterrupted run would have.
//!
//! ```
//! use candle_core::Device;
//! use ddim::train::{Dataset, Fit, TrainConfig, Trainer};
//!
//! let data = Dataset::builtin("digits", None, Fit::Crop)?;
//! let config = TrainConfig::new(ddim::train::preset("tiny", 1, 8)?);
//! let mut trainer = Trainer::new(config, &Device::Cpu)?;
//! let stats = trainer.step(&data)?;
//! assert!(stats.loss.is_finite() && trainer.step_count() == 1);
//! # Ok::<(), ddim::Error>(())
//! ```

pub mod checkpoint;
pub mod data;
pub mod optim;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use checkpoint::{load_state, save_pipeline, save_state, STATE_NAME};
pub use data::{Dataset, Fit, BUILTIN_DATASETS};
pub use optim::{AdamWConfig, EmaDecay, LrSchedule, Moments};

use crate::rng::ImageStream;
use crate::scheduler::{DDPMScheduler, PredictionType, SchedulerConfig};
use crate::unet::{DownBlockType, UNet2DConfig, UNet2DModel, UpBlockType};
use crate::{Error, Result};

/// Streams of the per-step random choices, apart from those of sampling (`ImageStream` keys
/// (seed, image index)); XORed into the seed.
const DATA_SALT: u64 = 0x6464_696d_6461_7461; // "ddimdata"
const NOISE_SALT: u64 = 0x6464_696d_6e6f_6973; // "ddimnois"
const INIT_SALT: u64 = 0x6464_696d_696e_6974; // "ddiminit"

/// Everything that defines a training run; saved with every checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// The UNet to train.
    pub unet: UNet2DConfig,
    /// The noise schedule (and `prediction_type`, the training target).
    pub scheduler: SchedulerConfig,
    /// Optimisation steps in all.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// The learning-rate schedule after the warmup.
    pub lr_schedule: LrSchedule,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this (diffusers' default 1).
    pub max_grad_norm: Option<f64>,
    /// The EMA decay.
    pub ema: EmaDecay,
    /// Seeds the weights and every random choice.
    pub seed: u64,
    /// Flip each image horizontally with probability 1/2.
    pub random_flip: bool,
    /// Where the starting weights came from ([`Trainer::load_weights`]; the caller describes
    /// them, e.g. a model folder and its weights' SHA-256); `None`: initialised from `seed`.
    pub init_from: Option<String>,
}

impl TrainConfig {
    /// diffusers' `train_unconditional.py` defaults for `unet`: DDPM linear schedule over 1000
    /// steps (ε target), batch 16, AdamW lr 1e-4, 500 warmup steps, cosine decay, clipping at 1,
    /// EMA warmup to 0.9999; 10,000 steps, seed 0, no flips.
    pub fn new(unet: UNet2DConfig) -> Self {
        TrainConfig {
            unet,
            scheduler: SchedulerConfig::default(),
            steps: 10_000,
            batch_size: 16,
            adamw: AdamWConfig::default(),
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 500,
            max_grad_norm: Some(1.0),
            ema: EmaDecay::Warmup {
                max: 0.9999,
                inv_gamma: 1.0,
                power: 0.75,
            },
            seed: 0,
            random_flip: false,
            init_from: None,
        }
    }

    /// Checks the values a user sets.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        self.scheduler.validate()?;
        // Training keeps weights, gradients, two AdamW moments and the EMA: about 20 bytes
        // a parameter. Refuse before allocating what no machine here could hold.
        let params = UNet2DModel::parameter_count(&self.unet)?;
        if params > MAX_TRAIN_PARAMETERS {
            return Err(Error::config(
                "unet config",
                format!(
                    "{params} parameters (about {} GB of training state)",
                    params as u64 * 20 / 1_000_000_000
                ),
                format!("at most {MAX_TRAIN_PARAMETERS} parameters"),
            ));
        }
        if self.steps == 0 {
            return Err(Error::argument("steps", 0, "at least 1 training step"));
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return Err(Error::argument("batch-size", self.batch_size, "1 to 65536"));
        }
        let lr = self.adamw.lr;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::argument("lr", lr, "a positive finite learning rate"));
        }
        for (name, b) in [("beta1", self.adamw.beta1), ("beta2", self.adamw.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::argument(name, b, "in [0, 1)"));
            }
        }
        if !(self.adamw.eps.is_finite() && self.adamw.eps > 0.0) {
            return Err(Error::argument(
                "adam-eps",
                self.adamw.eps,
                "a positive number",
            ));
        }
        if !(self.adamw.weight_decay.is_finite() && self.adamw.weight_decay >= 0.0) {
            return Err(Error::argument(
                "weight-decay",
                self.adamw.weight_decay,
                "a number >= 0",
            ));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(Error::argument("max-grad-norm", n, "a positive number"));
            }
        }
        let max_decay = match self.ema {
            EmaDecay::Fixed(d) => d,
            EmaDecay::Warmup { max, .. } => max,
        };
        if !(0.0..1.0).contains(&max_decay) {
            return Err(Error::argument("ema-decay", max_decay, "in [0, 1)"));
        }
        if self.unet.dropout != 0.0 {
            return Err(Error::config(
                "dropout",
                self.unet.dropout,
                "0 for training: the trainer does not implement dropout",
            ));
        }
        if self.unet.sample_size.is_none() {
            return Err(Error::config(
                "sample_size",
                "null",
                "a training UNet needs its sample_size (the training resolution)",
            ));
        }
        Ok(())
    }

    /// The config as JSON (stored in the training state; [`StoredConfig`] names its keys).
    pub fn to_json(&self) -> serde_json::Value {
        let (ema, ema_max_decay, ema_inv_gamma, ema_power) = match self.ema {
            EmaDecay::Fixed(d) => ("fixed", d, 1.0, 0.75),
            EmaDecay::Warmup {
                max,
                inv_gamma,
                power,
            } => ("warmup", max, inv_gamma, power),
        };
        let stored = StoredConfig {
            unet: self.unet.to_json(),
            scheduler: self
                .scheduler
                .to_json(crate::scheduler::SchedulerKind::Ddpm),
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.adamw.lr,
            adam_beta1: self.adamw.beta1,
            adam_beta2: self.adamw.beta2,
            adam_epsilon: self.adamw.eps,
            adam_weight_decay: self.adamw.weight_decay,
            lr_scheduler: self.lr_schedule.name().to_string(),
            lr_warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            ema: ema.to_string(),
            ema_max_decay,
            ema_inv_gamma,
            ema_power,
            seed: self.seed,
            random_flip: self.random_flip,
            init_from: self.init_from.clone(),
        };
        serde_json::to_value(stored).expect("a training config serialises")
    }

    /// Reads what [`TrainConfig::to_json`] wrote.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let stored: StoredConfig = serde_json::from_value(value.clone()).map_err(|e| {
            Error::config(
                "training config",
                "missing or malformed",
                format!("the keys a checkpoint stores ({e})"),
            )
        })?;
        let (unet, _) = UNet2DConfig::from_json_str(&stored.unet.to_string())?;
        let scheduler = SchedulerConfig::from_json_str(&stored.scheduler.to_string())?.config;
        let ema = match stored.ema.as_str() {
            "fixed" => EmaDecay::Fixed(stored.ema_max_decay),
            "warmup" => EmaDecay::Warmup {
                max: stored.ema_max_decay,
                inv_gamma: stored.ema_inv_gamma,
                power: stored.ema_power,
            },
            other => return Err(Error::config("ema", other, "fixed or warmup")),
        };
        Ok(TrainConfig {
            unet,
            scheduler,
            steps: stored.steps,
            batch_size: stored.batch_size,
            adamw: AdamWConfig {
                lr: stored.lr,
                beta1: stored.adam_beta1,
                beta2: stored.adam_beta2,
                eps: stored.adam_epsilon,
                weight_decay: stored.adam_weight_decay,
            },
            lr_schedule: LrSchedule::from_name(&stored.lr_scheduler)?,
            warmup_steps: stored.lr_warmup_steps,
            max_grad_norm: stored.max_grad_norm,
            ema,
            seed: stored.seed,
            random_flip: stored.random_flip,
            init_from: stored.init_from,
        })
    }
}

/// A [`TrainConfig`] as the training state stores it: the keys of diffusers'
/// `train_unconditional.py` arguments where it has them (`lr_scheduler`, `lr_warmup_steps`,
/// `adam_*`, `ema_*`, `random_flip`), the UNet and scheduler configs in diffusers' format.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredConfig {
    unet: serde_json::Value,
    scheduler: serde_json::Value,
    steps: u64,
    batch_size: usize,
    lr: f64,
    adam_beta1: f64,
    adam_beta2: f64,
    adam_epsilon: f64,
    adam_weight_decay: f64,
    lr_scheduler: String,
    lr_warmup_steps: u64,
    max_grad_norm: Option<f64>,
    /// `fixed` or `warmup`.
    ema: String,
    ema_max_decay: f64,
    ema_inv_gamma: f64,
    ema_power: f64,
    seed: u64,
    random_flip: bool,
    /// Absent in runs initialised from the seed (and in states saved before the key existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init_from: Option<String>,
}

/// The named UNet configs `ddim train --preset` offers, for `channels`-channel images of
/// `size × size`:
/// - `tiny`: (32, 64) channels, one ResNet per level, attention at the lowest level; for tests
///   and 8×8 digits.
/// - `small`: (32, 64, 64) channels, two ResNets per level, attention at the lowest level and
///   in the middle block, heads of 32 channels (about 1.7 M parameters); the shipped MNIST model.
/// - `ddpm-cifar10`: the 35.7 M-parameter architecture of google/ddpm-cifar10-32.
pub fn preset(name: &str, channels: usize, size: usize) -> Result<UNet2DConfig> {
    let mut c = UNet2DConfig::default();
    // (block_out_channels, layers_per_block, attention at each level)
    let (blocks, layers, attention): (&[usize], usize, &[bool]) = match name {
        "tiny" => (&[32, 64], 1, &[false, true]),
        "small" => (&[32, 64, 64], 2, &[false, false, true]),
        "ddpm-cifar10" => (&[128, 256, 256, 256], 2, &[false, true, false, false]),
        other => {
            return Err(Error::argument(
                "preset",
                other,
                "tiny, small or ddpm-cifar10",
            ))
        }
    };
    c.in_channels = channels;
    c.out_channels = channels;
    c.sample_size = Some((size, size));
    c.block_out_channels = blocks.to_vec();
    c.layers_per_block = layers;
    c.norm_num_groups = 32.min(blocks[0]);
    c.down_block_types = attention
        .iter()
        .map(|&a| {
            if a {
                DownBlockType::AttnDownBlock2D
            } else {
                DownBlockType::DownBlock2D
            }
        })
        .collect();
    c.up_block_types = attention
        .iter()
        .rev()
        .map(|&a| {
            if a {
                UpBlockType::AttnUpBlock2D
            } else {
                UpBlockType::UpBlock2D
            }
        })
        .collect();
    // Heads of 32 channels: diffusers' default of 8 makes many tiny products on the CPU.
    c.attention_head_dim = Some(32);
    if name == "ddpm-cifar10" {
        c.flip_sin_to_cos = false;
        c.freq_shift = 1.0;
        c.downsample_padding = 0;
        c.attention_head_dim = None;
    }
    c.validate()?;
    Ok(c)
}

/// The examples of one optimisation step.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Clean images x_0, NCHW in [-1, 1].
    pub x0: Tensor,
    /// The noise ε, of x_0's shape.
    pub noise: Tensor,
    /// One training timestep per image, below `num_train_timesteps`.
    pub timesteps: Vec<usize>,
}

/// What one optimisation step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The step just taken, from 1.
    pub step: u64,
    /// The batch's mean squared error.
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
}

/// A model in training: the weights (as candle variables), the AdamW moments, the EMA weights,
/// the step count and the loss of every step so far.
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    model: UNet2DModel,
    /// Parameter names in sorted order; `vars`, `params`, `moments` and `ema` follow it.
    names: Vec<String>,
    vars: Vec<Var>,
    params: Vec<Vec<f32>>,
    moments: Vec<Moments>,
    ema: Vec<Vec<f32>>,
    losses: Vec<f32>,
    noise: DDPMScheduler,
    /// The permutation of the current epoch, cached.
    order: Option<(u64, Vec<u32>)>,
}

/// The largest UNet `ddim train` builds: 1 G parameters (about 20 GB of training state).
pub const MAX_TRAIN_PARAMETERS: usize = 1_000_000_000;

impl Trainer {
    /// A new run: weights initialised from `config.seed` as PyTorch initialises them
    /// (`kaiming_uniform_(a = sqrt(5))` for convolutions and linear layers, i.e.
    /// U(±1/sqrt(fan_in)) for weights and biases; ones and zeros for norms; N(0, 1) for
    /// embedding tables).
    pub fn new(config: TrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = UNet2DModel::new(&config.unet, vb)?;
        let (names, vars) = sorted_vars(&varmap)?;
        let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.dims().to_vec()).collect();
        let params = init_params(&names, &shapes, config.seed);
        for (var, (p, shape)) in vars.iter().zip(params.iter().zip(&shapes)) {
            var.set(&Tensor::from_slice(p, shape.as_slice(), device)?)?;
        }
        let moments = params.iter().map(|p| Moments::zeros(p.len())).collect();
        let ema = params.clone();
        let noise = DDPMScheduler::new(&config.scheduler)?;
        Ok(Trainer {
            config,
            device: device.clone(),
            model,
            names,
            vars,
            params,
            moments,
            ema,
            losses: Vec::new(),
            noise,
            order: None,
        })
    }

    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Changes the total number of steps (to train a resumed run for longer).
    pub fn set_total_steps(&mut self, steps: u64) -> Result<()> {
        if steps == 0 {
            return Err(Error::argument("steps", 0, "at least 1 training step"));
        }
        self.config.steps = steps;
        Ok(())
    }

    /// Optimisation steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.losses.len() as u64
    }

    /// The loss of every step so far.
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// Number of trained parameters.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(Vec::len).sum()
    }

    /// The parameters' diffusers names, in the order of [`Trainer::loss_and_gradients`].
    pub fn parameter_names(&self) -> &[String] {
        &self.names
    }

    /// The noise schedule the run trains on (`add_noise`, `get_velocity`).
    pub fn noise_scheduler(&self) -> &DDPMScheduler {
        &self.noise
    }

    /// The raw (not EMA) weights by diffusers name (on the CPU).
    pub fn weights(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.tensors_of(&self.params)
    }

    /// Starts the run from `weights` (diffusers names, every parameter of the model, f32) instead
    /// of the seeded initialisation: raw and EMA weights both. Only before the first step.
    pub fn load_weights(
        &mut self,
        weights: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        if self.step_count() > 0 {
            return Err(Error::argument(
                "weights",
                format!("a run at step {}", self.step_count()),
                "a run that has not taken a step",
            ));
        }
        let mut params = Vec::with_capacity(self.names.len());
        for (name, var) in self.names.iter().zip(&self.vars) {
            let t = weights.get(name).ok_or_else(|| {
                Error::argument("weights", name, "a tensor for every parameter of the model")
            })?;
            if t.dims() != var.dims() {
                return Err(Error::argument(
                    "weights",
                    format!("{name} of shape {:?}", t.dims()),
                    format!("shape {:?}", var.dims()),
                ));
            }
            params.push(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        if let Some(extra) = weights.keys().find(|k| !self.names.contains(k)) {
            return Err(Error::argument(
                "weights",
                extra,
                "a parameter of the model",
            ));
        }
        let moments = params.iter().map(|p| Moments::zeros(p.len())).collect();
        let ema = params.clone();
        self.restore(params, moments, ema, Vec::new())
    }

    /// The model being trained (raw weights, not the EMA).
    pub fn model(&self) -> &UNet2DModel {
        &self.model
    }

    /// The indices of the images of step `step` (from 0): position `step·B + i` of the
    /// concatenation of one seeded permutation of the data per epoch.
    fn batch_indices(&mut self, step: u64, n: usize) -> Vec<usize> {
        let b = self.config.batch_size as u64;
        let mut out = Vec::with_capacity(b as usize);
        for pos in step * b..(step + 1) * b {
            let epoch = pos / n as u64;
            if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                self.order = Some((epoch, epoch_permutation(self.config.seed, epoch, n)));
            }
            let order = &self.order.as_ref().expect("just set").1;
            out.push(order[(pos % n as u64) as usize] as usize);
        }
        out
    }

    /// The examples of the next step (step [`Trainer::step_count`] from 0): its images of
    /// `data`, their flips, t and ε, all a function of (seed, step).
    pub fn next_batch(&mut self, data: &Dataset) -> Result<Batch> {
        let c = &self.config.unet;
        if data.channels != c.in_channels || Some((data.size, data.size)) != c.sample_size {
            return Err(Error::argument(
                "data",
                format!(
                    "{} ({} channel(s), {}×{})",
                    data.source, data.channels, data.size, data.size
                ),
                format!(
                    "images of the model's {} channel(s) and sample_size {:?}",
                    c.in_channels, c.sample_size
                ),
            ));
        }
        if data.len == 0 {
            return Err(Error::argument("data", &data.source, "at least one image"));
        }
        let step = self.step_count();
        let b = self.config.batch_size;
        let (ch, s) = (data.channels, data.size);
        let per_image = ch * s * s;

        let indices = self.batch_indices(step, data.len);
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ DATA_SALT);
        rng.set_stream(step);
        let mut x0 = Vec::with_capacity(b * per_image);
        for &i in &indices {
            let img = data.image(i);
            if self.config.random_flip && rng.random_bool(0.5) {
                for row in img.chunks_exact(s) {
                    x0.extend(row.iter().rev());
                }
            } else {
                x0.extend_from_slice(img);
            }
        }
        let t_max = self.config.scheduler.num_train_timesteps;
        let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..t_max)).collect();
        let mut noise = vec![0f32; b * per_image];
        ImageStream::new(self.config.seed ^ NOISE_SALT, step).fill_normal(&mut noise);
        let shape = (b, ch, s, s);
        Ok(Batch {
            x0: Tensor::from_vec(x0, shape, &self.device)?,
            noise: Tensor::from_vec(noise, shape, &self.device)?,
            timesteps,
        })
    }

    /// The objective on `batch` at the current weights: the mean squared error of the UNet's
    /// prediction of ε (or v, or x_0) from `x_t = add_noise(x_0, ε, t)`, and the gradient of
    /// every parameter, in the order of [`Trainer::parameter_names`]. Changes nothing.
    pub fn loss_and_gradients(&self, batch: &Batch) -> Result<(f32, Vec<Vec<f32>>)> {
        let (x0, eps, timesteps) = (&batch.x0, &batch.noise, &batch.timesteps);
        let (b, ch) = (x0.dim(0)?, x0.dim(1)?);
        if eps.dims() != x0.dims() || timesteps.len() != b {
            return Err(Error::argument(
                "batch",
                format!(
                    "x0 {:?}, noise {:?}, {} timesteps",
                    x0.dims(),
                    eps.dims(),
                    timesteps.len()
                ),
                "noise of x0's shape and one timestep per image",
            ));
        }
        let x_t = self.noise.add_noise(x0, eps, timesteps)?;
        let target = match self.config.scheduler.prediction_type {
            PredictionType::Epsilon => eps.clone(),
            PredictionType::VPrediction => self.noise.get_velocity(x0, eps, timesteps)?,
            PredictionType::Sample => x0.clone(),
        };
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, b, &self.device)?;
        let pred = self.model.forward(&x_t, &t, None)?;
        let pred = if pred.dim(1)? == 2 * ch {
            pred.narrow(1, 0, ch)?
        } else {
            pred
        };
        let loss = (pred - &target)?.sqr()?.mean_all()?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Ok((loss_value, Vec::new()));
        }
        let grads = loss.backward()?;
        let mut flat = Vec::with_capacity(self.vars.len());
        for var in &self.vars {
            // No gradient reaches a parameter whose gradient is identically zero (the key bias
            // of softmax attention shifts every score of a query equally), as in PyTorch.
            let g: Vec<f32> = match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1()?,
                None => vec![0.0; var.elem_count()],
            };
            flat.push(g);
        }
        Ok((loss_value, flat))
    }

    /// One optimisation step on a batch of `data`. A loss or gradient that is not finite
    /// leaves the weights as they were and returns [`Error::Diverged`].
    pub fn step(&mut self, data: &Dataset) -> Result<StepStats> {
        let batch = self.next_batch(data)?;
        self.step_on(&batch)
    }

    /// One optimisation step on `batch`: the gradient, clipping, AdamW at the step's learning
    /// rate and the EMA update. A loss or gradient that is not finite leaves the weights as
    /// they were and returns [`Error::Diverged`].
    pub fn step_on(&mut self, batch: &Batch) -> Result<StepStats> {
        let (loss, gradients) = self.loss_and_gradients(batch)?;
        self.apply_gradients(loss, &gradients)
    }

    /// The update of one optimisation step from its loss and gradients (in the order of
    /// [`Trainer::parameter_names`]): clipping to the global norm, AdamW at the step's learning
    /// rate, the EMA update; the loss joins the record. A loss or gradient that is not finite
    /// changes nothing and returns [`Error::Diverged`].
    pub fn apply_gradients(&mut self, loss_value: f32, flat: &[Vec<f32>]) -> Result<StepStats> {
        let step = self.step_count();
        let sizes_match = flat.len() == self.params.len()
            && flat
                .iter()
                .zip(&self.params)
                .all(|(g, p)| g.len() == p.len());
        if !sizes_match && loss_value.is_finite() {
            return Err(Error::argument(
                "gradients",
                format!("{} tensors", flat.len()),
                format!("one per parameter, of its size ({})", self.params.len()),
            ));
        }
        if !loss_value.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                what: format!("loss {loss_value}"),
            });
        }
        let sq: f64 = flat
            .iter()
            .map(|g| g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .sum();
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Diverged {
                step: step + 1,
                what: format!("gradient norm {grad_norm}"),
            });
        }
        let scale = optim::clip_factor(grad_norm, self.config.max_grad_norm);
        let lr = self.config.lr_schedule.lr(
            self.config.adamw.lr,
            step,
            self.config.warmup_steps,
            self.config.steps,
        );
        let decay = self.config.ema.decay(step + 1);
        let slots = self
            .params
            .iter_mut()
            .zip(&mut self.moments)
            .zip(&mut self.ema)
            .zip(&self.vars);
        for ((((param, moments), ema), var), grad) in slots.zip(flat) {
            optim::adamw_update(
                &self.config.adamw,
                lr,
                step + 1,
                param,
                grad,
                scale,
                moments,
            );
            optim::ema_update(ema, param, decay);
            var.set(&Tensor::from_slice(param, var.dims(), &self.device)?)?;
        }
        self.losses.push(loss_value);
        Ok(StepStats {
            step: step + 1,
            loss: loss_value,
            grad_norm,
            lr,
        })
    }

    /// A model with the EMA weights, for sampling.
    pub fn ema_model(&self) -> Result<UNet2DModel> {
        let vb = VarBuilder::from_tensors(self.ema_tensors()?, DType::F32, &self.device);
        UNet2DModel::new(&self.config.unet, vb)
    }

    fn tensors_of(&self, values: &[Vec<f32>]) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        for ((name, var), v) in self.names.iter().zip(&self.vars).zip(values) {
            out.insert(
                name.clone(),
                Tensor::from_slice(v, var.dims(), &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// The EMA weights by diffusers name (on the CPU).
    pub fn ema_tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.tensors_of(&self.ema)
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step_count())
            .field("parameters", &self.num_parameters())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn sorted_vars(varmap: &VarMap) -> Result<(Vec<String>, Vec<Var>)> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::argument("model", "variables", "an unpoisoned lock"))?;
    let mut entries: Vec<(String, Var)> =
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries.into_iter().unzip())
}

/// A seeded Fisher–Yates permutation of 0..n for `epoch`.
fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ DATA_SALT ^ 0x5555_5555_5555_5555);
    rng.set_stream(epoch);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// PyTorch's default initialisation, drawn in name order from `seed`.
fn init_params(names: &[String], shapes: &[Vec<usize>], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ INIT_SALT);
    let fan_in = |name: &str| -> Option<usize> {
        let weight = format!("{}.weight", name.strip_suffix(".bias")?);
        let i = names.iter().position(|n| *n == weight)?;
        let s = &shapes[i];
        (s.len() >= 2).then(|| s[1..].iter().product())
    };
    names
        .iter()
        .zip(shapes)
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let leaf = name.rsplit('.').next().unwrap_or("");
            let owner = name.rsplit('.').nth(1).unwrap_or("");
            let is_norm = owner.contains("norm") && shape.len() == 1;
            if is_norm {
                return vec![if leaf == "weight" { 1.0 } else { 0.0 }; n];
            }
            let is_table = name == "class_embedding.weight" || name.starts_with("time_proj.");
            if is_table {
                // Gaussian Fourier features are N(0, 1) · 16 (diffusers' `scale=16`).
                let scale = if shape.len() == 1 { 16.0 } else { 1.0 };
                let mut v = vec![0f32; n];
                ImageStream::new(rng.random(), 0).fill_normal(&mut v);
                return v.into_iter().map(|x| x * scale).collect();
            }
            let fan = if leaf == "bias" {
                fan_in(name).unwrap_or(n)
            } else if shape.len() >= 2 {
                shape[1..].iter().product()
            } else {
                n
            };
            let bound = 1.0 / (fan.max(1) as f64).sqrt();
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        })
        .collect()
}

/// Names, variables, raw weights, AdamW moments and EMA weights, in name order.
pub(crate) type Parts<'a> = (
    &'a [String],
    &'a [Var],
    &'a [Vec<f32>],
    &'a [Moments],
    &'a [Vec<f32>],
);

/// Trainer internals the checkpoint code reads and restores.
impl Trainer {
    pub(crate) fn parts(&self) -> Parts<'_> {
        (
            &self.names,
            &self.vars,
            &self.params,
            &self.moments,
            &self.ema,
        )
    }

    pub(crate) fn restore(
        &mut self,
        params: Vec<Vec<f32>>,
        moments: Vec<Moments>,
        ema: Vec<Vec<f32>>,
        losses: Vec<f32>,
    ) -> Result<()> {
        for (var, p) in self.vars.iter().zip(&params) {
            var.set(&Tensor::from_slice(p, var.dims(), &self.device)?)?;
        }
        self.params = params;
        self.moments = moments;
        self.ema = ema;
        self.losses = losses;
        self.order = None;
        Ok(())
    }
}
