//! Noise schedulers at diffusers parity: [`DDIMScheduler`] (Song et al. 2020, eq. 12),
//! [`DDPMScheduler`] (Ho et al. 2020, eq. 6-7) and [`DDIMInverseScheduler`] (x_0 -> x_T),
//! configured by diffusers' `scheduler_config.json` ([`SchedulerConfig`]).
//!
//! Schedulers never draw noise: a step that needs noise takes it as an argument, so the caller's
//! generator decides every random number. `eta` is an argument of each DDIM step, not a setting.
//! The previous timestep of a step is read off the timestep list, never computed as `t - T/N`.

mod config;
mod ddim;
mod ddim_inverse;
mod ddpm;
mod deis;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod heun;
pub(crate) mod kernel;
mod lms;
mod pndm;
pub mod sigmas;
mod unipc;

use candle_core::Tensor;

pub use config::{
    AlgorithmType, FinalSigmasType, InterpolationType, LoadedSchedulerConfig, PredictionType,
    SchedulerConfig, SchedulerKind, SolverType, TimestepSpacing, TimestepType, VarianceType,
};
pub use ddim::{DDIMScheduler, DdimSampler};
pub use ddim_inverse::DDIMInverseScheduler;
pub use ddpm::DDPMScheduler;
pub use deis::DEISMultistepScheduler;
pub use dpm_solver::DPMSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use heun::HeunDiscreteScheduler;
pub use lms::{lagrange_integral, LMSDiscreteScheduler, LMS_ORDER};
pub use pndm::PNDMScheduler;
pub use unipc::UniPCMultistepScheduler;

use crate::{Error, Result};

/// What one scheduler step returns.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The sample at the next timestep of the schedule (x_{t-1} when sampling, x_{t+1} when inverting).
    pub prev_sample: Tensor,
    /// The model's prediction of x_0 at this step (after clipping or thresholding).
    pub pred_original_sample: Tensor,
}

/// The options of a DDIM step (diffusers passes them to each `step` call).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdimStepOptions {
    /// η of eq. 16: 0 is deterministic DDIM, 1 has DDPM's variance.
    pub eta: f64,
    /// Re-derive ε̂ from the clipped x̂0 (GLIDE).
    pub use_clipped_model_output: bool,
}

impl DdimStepOptions {
    /// η, and ε̂ as the model gave it.
    pub fn with_eta(eta: f64) -> Self {
        DdimStepOptions {
            eta,
            use_clipped_model_output: false,
        }
    }
}

impl Default for DdimStepOptions {
    /// diffusers' defaults: η = 0, no re-derived ε̂.
    fn default() -> Self {
        Self::with_eta(0.0)
    }
}

/// The one interface the sampling loop ([`crate::pipeline::denoise`]) drives, as diffusers'
/// pipelines drive a scheduler: the timesteps to visit, the scale of the starting sample, the
/// model input, and a step that keeps whatever state the sampler needs between calls. Steps are
/// addressed by their index in [`Scheduler::timesteps`], so a sampler that visits a timestep
/// twice (Heun) or keeps a history (multistep solvers) needs nothing else from the loop.
///
/// Schedulers never draw noise: [`Scheduler::needs_noise`] says which steps take it, and the
/// loop draws it from the caller's generator in diffusers' order.
pub trait Scheduler {
    /// The model's timestep input at each step, in the order visited (fractional for
    /// sigma-interpolating samplers such as Euler; a timestep may repeat, as in Heun).
    fn model_timesteps(&self) -> Vec<f64>;

    /// The noise level σ of each step and the one after the last, for sigma-parameterised
    /// samplers (`None` for DDPM-type samplers, which work with ᾱ_t).
    fn sigmas(&self) -> Option<Vec<f64>> {
        None
    }

    /// The standard deviation the starting sample is scaled to (1 for DDPM-type samplers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The model input at step `index` (x unchanged for DDPM-type samplers).
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let _ = index;
        Ok(sample.clone())
    }

    /// Whether step `index` adds noise (then [`Scheduler::step`] needs it).
    fn needs_noise(&self, index: usize) -> bool;

    /// Whether the step reads a predicted variance from 2·C model output channels; otherwise
    /// the loop passes only the first C.
    fn uses_model_variance(&self) -> bool {
        false
    }

    /// Step `index`: from `sample` and the model's output on it to the next sample.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput>;
}

/// A scheduler of class `kind` set to `num_inference_steps`, from `config` converted to that
/// class as diffusers' `Class.from_config(config)` does. `ddim` holds the DDIM step's options
/// (η), which no other class reads.
pub fn build(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    num_inference_steps: usize,
    ddim: DdimStepOptions,
) -> Result<Box<dyn Scheduler>> {
    let config = if config.kind() == Some(kind) {
        config.clone()
    } else {
        config.converted_to(kind)?
    };
    config.check_implemented(kind)?;
    let n = num_inference_steps;
    Ok(match kind {
        SchedulerKind::Ddim => {
            let mut scheduler = DDIMScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(DdimSampler {
                scheduler,
                options: ddim,
            })
        }
        SchedulerKind::Ddpm => {
            let mut scheduler = DDPMScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::DdimInverse => {
            let mut scheduler = DDIMInverseScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::DpmSolverMultistep => {
            Box::new(DPMSolverMultistepScheduler::new(&config, n)?)
        }
        SchedulerKind::EulerDiscrete => {
            let mut scheduler = EulerDiscreteScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::EulerAncestralDiscrete => {
            let mut scheduler = EulerAncestralDiscreteScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::HeunDiscrete => {
            let mut scheduler = HeunDiscreteScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::LmsDiscrete => {
            let mut scheduler = LMSDiscreteScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::Pndm => {
            let mut scheduler = PNDMScheduler::new(&config)?;
            scheduler.set_timesteps(n)?;
            Box::new(scheduler)
        }
        SchedulerKind::UniPcMultistep => Box::new(UniPCMultistepScheduler::new(&config, n)?),
        SchedulerKind::DeisMultistep => Box::new(DEISMultistepScheduler::new(&config, n)?),
    })
}

/// The samplers the command line names besides diffusers' class names: each a class and the
/// options the name implies (on top of the model's config converted to that class).
pub const SAMPLER_NAMES: &[(&str, SchedulerKind, &str)] = &[
    ("ddim", SchedulerKind::Ddim, "{}"),
    ("ddpm", SchedulerKind::Ddpm, "{}"),
    (
        "dpm++2m",
        SchedulerKind::DpmSolverMultistep,
        r#"{"algorithm_type": "dpmsolver++", "solver_order": 2}"#,
    ),
    (
        "dpm++3m",
        SchedulerKind::DpmSolverMultistep,
        r#"{"algorithm_type": "dpmsolver++", "solver_order": 3}"#,
    ),
    (
        "dpm++2m-sde",
        SchedulerKind::DpmSolverMultistep,
        r#"{"algorithm_type": "sde-dpmsolver++", "solver_order": 2}"#,
    ),
    (
        "dpm++3m-sde",
        SchedulerKind::DpmSolverMultistep,
        r#"{"algorithm_type": "sde-dpmsolver++", "solver_order": 3}"#,
    ),
    ("unipc", SchedulerKind::UniPcMultistep, "{}"),
    ("deis", SchedulerKind::DeisMultistep, "{}"),
    ("euler", SchedulerKind::EulerDiscrete, "{}"),
    ("euler-a", SchedulerKind::EulerAncestralDiscrete, "{}"),
    ("heun", SchedulerKind::HeunDiscrete, "{}"),
    ("pndm", SchedulerKind::Pndm, "{}"),
    ("lms", SchedulerKind::LmsDiscrete, "{}"),
];

/// The options a sampler choice sets on the model's config.
pub type SamplerOptions = serde_json::Map<String, serde_json::Value>;

/// A sampler named by a short name ([`SAMPLER_NAMES`]) or a diffusers class name: its class and
/// the options the name implies. An unknown name is an error listing every name.
pub fn parse_sampler(name: &str) -> Result<(SchedulerKind, SamplerOptions)> {
    if let Some((_, kind, options)) = SAMPLER_NAMES.iter().find(|(n, _, _)| *n == name) {
        let options = match serde_json::from_str(options) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => SamplerOptions::new(),
        };
        return Ok((*kind, options));
    }
    match SchedulerKind::from_class_name(name) {
        Some(kind) if kind != SchedulerKind::DdimInverse => Ok((kind, SamplerOptions::new())),
        _ => Err(Error::argument(
            "scheduler",
            name,
            format!(
                "allowed: {}, or a class name: {}",
                SAMPLER_NAMES
                    .iter()
                    .map(|(n, _, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                implemented_names()
            ),
        )),
    }
}

/// The class names [`build`] accepts.
pub fn implemented_names() -> String {
    [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::DdimInverse,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
        SchedulerKind::HeunDiscrete,
        SchedulerKind::LmsDiscrete,
        SchedulerKind::Pndm,
        SchedulerKind::UniPcMultistep,
        SchedulerKind::DeisMultistep,
    ]
    .iter()
    .map(|k| k.class_name())
    .collect::<Vec<_>>()
    .join(", ")
}

/// The timestep of step `index`, or an error naming both.
fn timestep_at(timesteps: &[usize], index: usize) -> Result<usize> {
    timesteps.get(index).copied().ok_or_else(|| {
        Error::argument(
            "index",
            index,
            format!(
                "the schedule has {} steps: set_timesteps first, and index from 0",
                timesteps.len()
            ),
        )
    })
}

/// The inference timesteps of `spacing`, in the order they are visited when sampling (descending).
///
/// `leading` adds `steps_offset`; the others ignore it, as in diffusers. Errors name the value
/// when `num_inference_steps` is 0 or exceeds `num_train_timesteps`, or when the offset pushes a
/// timestep past the end.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let t_max = num_train_timesteps;
    let n = num_inference_steps;
    if n == 0 || n > t_max {
        return Err(Error::argument(
            "num_inference_steps",
            n,
            format!("must be between 1 and num_train_timesteps = {t_max}"),
        ));
    }
    let mut ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = t_max / n;
            (0..n).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Linspace => {
            // np.linspace(0, T - 1, N).round(): numpy rounds half to even.
            let stop = (t_max - 1) as f64;
            let step = if n > 1 { stop / (n - 1) as f64 } else { 0.0 };
            (0..n)
                .rev()
                .map(|i| {
                    // numpy: the last value is `stop` exactly, except that N = 1 gives `[start]`.
                    let v = if i == n - 1 && n > 1 {
                        stop
                    } else {
                        i as f64 * step
                    };
                    v.round_ties_even() as usize
                })
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.round(np.arange(T, 0, -T/N)) - 1, with numpy's arange arithmetic: the values are
            // start + i * delta where delta = (start + step) - start.
            let step = -(t_max as f64 / n as f64);
            let start = t_max as f64;
            let delta = (start + step) - start;
            (0..n)
                .map(|i| {
                    let v = (start + i as f64 * delta).round_ties_even();
                    (v as usize).saturating_sub(1)
                })
                .collect()
        }
        TimestepSpacing::Quad => {
            // The official DDIM code: int(linspace(0, sqrt(0.8 T), N)²), visited in reverse.
            // Repeated small values are merged: a step from t to the same t is the identity
            // (zero variance, same ᾱ), so merging changes nothing but the work done.
            let stop = (0.8 * t_max as f64).sqrt();
            let step = if n > 1 { stop / (n - 1) as f64 } else { 0.0 };
            let mut v: Vec<usize> = (0..n)
                .map(|i| {
                    let s = if i == n - 1 && n > 1 {
                        stop
                    } else {
                        i as f64 * step
                    };
                    (s * s) as usize
                })
                .collect();
            v.dedup();
            v.reverse();
            v
        }
    };
    if let Some(&first) = ts.iter().max() {
        if first >= t_max {
            return Err(Error::argument(
                "steps_offset",
                steps_offset,
                format!(
                    "with {n} leading steps it gives timestep {first}, past the last training \
                     timestep {}; lower steps_offset or the number of steps",
                    t_max - 1
                ),
            ));
        }
    }
    ts.dedup();
    Ok(ts)
}

/// The position of `timestep` in a schedule, or an error naming it and the schedule's range.
pub(crate) fn position_in(timesteps: &[usize], timestep: usize) -> Result<usize> {
    timesteps
        .iter()
        .position(|&t| t == timestep)
        .ok_or_else(|| {
            Error::argument(
                "timestep",
                timestep,
                format!(
                    "is not in the schedule set by set_timesteps ({} steps from {} to {})",
                    timesteps.len(),
                    timesteps.first().copied().unwrap_or(0),
                    timesteps.last().copied().unwrap_or(0)
                ),
            )
        })
}

/// The noise levels shared by every scheduler: betas and ᾱ_t (`alphas_cumprod`), float32 as in diffusers.
#[derive(Clone, Debug)]
pub(crate) struct NoiseLevels {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseLevels {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let betas = config.betas()?;
        let alphas_cumprod = crate::schedule::alphas_cumprod(&betas);
        Ok(NoiseLevels {
            betas,
            alphas_cumprod,
        })
    }

    /// ᾱ_t, or an error naming `t` when it is not a training timestep.
    pub fn alpha_prod(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::argument(
                "timestep",
                t,
                format!(
                    "must be a training timestep in 0..{}",
                    self.alphas_cumprod.len()
                ),
            )
        })
    }

    /// Per-image (b, 1, ..., 1) tensors sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) for `timesteps`.
    fn coefficient_tensors(&self, like: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let b = like.dim(0)?;
        if timesteps.len() != b && timesteps.len() != 1 {
            return Err(Error::argument(
                "timesteps",
                format!("{} values", timesteps.len()),
                format!("one timestep per image (batch {b}) or a single one for all"),
            ));
        }
        let mut sa = Vec::with_capacity(b);
        let mut sb = Vec::with_capacity(b);
        for i in 0..b {
            let a = self.alpha_prod(timesteps[if timesteps.len() == 1 { 0 } else { i }])?;
            sa.push(a.sqrt());
            sb.push((1.0 - a).sqrt());
        }
        let mut shape = vec![1usize; like.rank()];
        shape[0] = b;
        let dtype = like.dtype();
        let sa = Tensor::from_vec(sa, shape.as_slice(), like.device())?.to_dtype(dtype)?;
        let sb = Tensor::from_vec(sb, shape.as_slice(), like.device())?.to_dtype(dtype)?;
        Ok((sa, sb))
    }

    /// q(x_t | x_0): `sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`, one timestep per image.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        same_shape("noise", noise, original)?;
        let (sa, sb) = self.coefficient_tensors(original, timesteps)?;
        Ok((original.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// The velocity target `v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0` (Salimans & Ho 2022).
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        same_shape("noise", noise, sample)?;
        let (sa, sb) = self.coefficient_tensors(sample, timesteps)?;
        Ok((noise.broadcast_mul(&sa)? - sample.broadcast_mul(&sb)?)?)
    }
}

fn same_shape(name: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.dims() != like.dims() {
        return Err(Error::argument(
            name,
            format!("a tensor of shape {:?}", t.dims()),
            format!("must have shape {:?}", like.dims()),
        ));
    }
    Ok(())
}

/// The clip of x̂0 a config asks for.
pub(crate) fn clip_of(config: &SchedulerConfig) -> kernel::Clip {
    if config.thresholding {
        kernel::Clip::Dynamic {
            ratio: config.dynamic_thresholding_ratio as f32,
            max: config.sample_max_value as f32,
        }
    } else if config.clip_sample {
        kernel::Clip::Range(config.clip_sample_range as f32)
    } else {
        kernel::Clip::None
    }
}

/// Refuses a step whose x̂0 or ε̂ would be a division by zero, instead of returning inf/NaN:
/// - ᾱ_t = 0 (zero terminal SNR at t = T) with an epsilon model: x̂0 = (x_t - ε̂) / 0. diffusers
///   returns inf there (huggingface/diffusers#3851).
/// - ᾱ = 1 (the clean start of an inversion with `set_alpha_to_one`) with a sample model:
///   ε̂ = (x - x̂0) / 0. diffusers returns NaN there.
pub(crate) fn check_defined(prediction: PredictionType, t: usize, alpha_prod: f32) -> Result<()> {
    if alpha_prod <= 0.0 && prediction == PredictionType::Epsilon {
        return Err(Error::argument(
            "timestep",
            t,
            "ᾱ_t = 0 here (zero terminal SNR), where an epsilon-prediction model cannot predict \
             x_0; use a v_prediction or sample model with rescale_betas_zero_snr, or a timestep \
             spacing that does not start at T-1 (e.g. leading)",
        ));
    }
    if alpha_prod >= 1.0 && prediction == PredictionType::Sample {
        return Err(Error::argument(
            "timestep",
            t,
            "ᾱ = 1 here (a noise-free sample), where a sample-prediction model gives no noise \
             estimate ε̂ = (x - x̂0) / 0; set set_alpha_to_one to false",
        ));
    }
    Ok(())
}

/// `eta` must be finite and non-negative.
pub(crate) fn check_eta(eta: f64) -> Result<()> {
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(Error::argument(
            "eta",
            eta,
            "must be a finite number >= 0 (0 is deterministic DDIM, 1 has DDPM's variance)",
        ));
    }
    Ok(())
}
