//! DDIM sampling (Song, Meng, Ermon 2020, arXiv:2010.02502, eq. 12 and 16), following diffusers'
//! `scheduling_ddim.py` key for key — except that the previous timestep is read off the timestep
//! list instead of `t - T // N`, which diffusers gets wrong for `linspace` and for `trailing`
//! when N does not divide T (huggingface/diffusers#12633). For `leading` the two agree.

use candle_core::Tensor;

use super::kernel::{self, StepCoefficients};
use super::{
    check_defined, check_eta, clip_of, position_in, spaced_timesteps, NoiseLevels, StepOutput,
};
use super::{timestep_at, DdimStepOptions, PredictionType, Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// The DDIM scheduler: a deterministic (eta = 0) or stochastic (eta > 0) non-Markovian sampler
/// for any model trained with the DDPM objective.
///
/// ```
/// use ddim::scheduler::{DDIMScheduler, SchedulerConfig};
/// let mut s = DDIMScheduler::new(&SchedulerConfig { steps_offset: 1, ..Default::default() })?;
/// s.set_timesteps(5)?;
/// assert_eq!(s.timesteps(), &[801, 601, 401, 201, 1]);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DDIMScheduler {
    config: SchedulerConfig,
    levels: NoiseLevels,
    /// ᾱ after the last step: 1 (`set_alpha_to_one`) or ᾱ_0.
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    num_inference_steps: Option<usize>,
}

impl DDIMScheduler {
    /// Builds the scheduler from a config (a DDPM config works too, as in diffusers'
    /// `DDIMScheduler.from_config`: `variance_type` is ignored).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let levels = NoiseLevels::new(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            levels.alphas_cumprod[0]
        };
        let timesteps = (0..config.num_train_timesteps).rev().collect();
        Ok(DDIMScheduler {
            config: config.clone(),
            levels,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// β_t for t in 0..T.
    pub fn betas(&self) -> &[f32] {
        &self.levels.betas
    }

    /// ᾱ_t for t in 0..T (float32, as diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.levels.alphas_cumprod
    }

    /// ᾱ used after the last step.
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// Sets the inference timesteps (`timestep_spacing` decides where they fall).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.timesteps = ts;
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    /// The timesteps visited, in order (descending). All T of them before `set_timesteps`.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep after `timestep` in the schedule, `None` after the last one (where ᾱ is
    /// [`DDIMScheduler::final_alpha_cumprod`]).
    pub fn previous_timestep(&self, timestep: usize) -> Result<Option<usize>> {
        let i = position_in(&self.timesteps, timestep)?;
        Ok(self.timesteps.get(i + 1).copied())
    }

    fn alpha_prod_prev(&self, prev: Option<usize>) -> Result<f32> {
        match prev {
            Some(p) => self.levels.alpha_prod(p),
            None => Ok(self.final_alpha_cumprod),
        }
    }

    /// σ_t²/η² of eq. 16: `(1 - ᾱ_prev) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_prev)`, with `prev = None`
    /// meaning the final ᾱ. Computed in float32 like diffusers' `_get_variance`.
    pub fn variance(&self, timestep: usize, prev_timestep: Option<usize>) -> Result<f32> {
        let a_t = self.levels.alpha_prod(timestep)?;
        let a_prev = self.alpha_prod_prev(prev_timestep)?;
        Ok(variance(a_t, a_prev))
    }

    /// One DDIM step from x_t to x_{prev} (eq. 12):
    ///
    /// `x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev - σ_t²) ε̂ + σ_t z`, with `σ_t = eta · sqrt(variance)`.
    ///
    /// `variance_noise` (z, the sample's shape) is required when `eta > 0` and ignored at
    /// `eta = 0`. With `use_clipped_model_output`, ε̂ is re-derived from the clipped x̂0 (GLIDE).
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        options: &DdimStepOptions,
        variance_noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let DdimStepOptions {
            eta,
            use_clipped_model_output,
        } = *options;
        check_eta(eta)?;
        // 1. the previous timestep, read off the schedule
        let prev = self.previous_timestep(timestep)?;
        // 2. ᾱ_t, ᾱ_prev
        let a_t = self.levels.alpha_prod(timestep)?;
        let a_prev = self.alpha_prod_prev(prev)?;
        check_defined(self.config.prediction_type, timestep, a_t)?;
        let beta_prod_t = 1.0 - a_t;
        // 5. σ_t (eq. 16)
        let std_dev_t = eta as f32 * variance(a_t, a_prev).sqrt();
        // 6. the coefficient of the "direction pointing to x_t"
        let dir = 1.0 - a_prev - std_dev_t * std_dev_t;
        if dir < 0.0 {
            return Err(Error::argument(
                "eta",
                eta,
                format!(
                    "is too large at timestep {timestep}: 1 - ᾱ_prev - σ_t² would be negative; \
                     eta <= 1 is always valid"
                ),
            ));
        }
        let noise = if eta > 0.0 {
            Some(variance_noise.ok_or_else(|| {
                Error::argument(
                    "variance_noise",
                    "None",
                    format!("a DDIM step with eta = {eta} > 0 needs noise of the sample's shape"),
                )
            })?)
        } else {
            None
        };
        let k = StepCoefficients {
            prediction: self.config.prediction_type,
            sqrt_alpha_prod: a_t.sqrt(),
            sqrt_beta_prod: beta_prod_t.sqrt(),
            clip: clip_of(&self.config),
            use_clipped_model_output,
            // 7. x_prev = sqrt(ᾱ_prev) x̂0 + direction + noise
            c_x0: a_prev.sqrt(),
            c_eps: dir.sqrt(),
            c_x: 0.0,
            noise_std: std_dev_t,
        };
        let (prev_sample, pred_original_sample) =
            kernel::fused_step(&k, model_output, sample, noise)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }

    /// q(x_t | x_0) for one timestep per image (or one for all).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        self.levels.add_noise(original, noise, timesteps)
    }

    /// The v-prediction target for one timestep per image (or one for all).
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        self.levels.get_velocity(sample, noise, timesteps)
    }

    /// What the model predicts.
    pub fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }
}

/// DDIM with its step options, as the sampling loop runs it.
#[derive(Clone, Debug)]
pub struct DdimSampler {
    /// The scheduler, its timesteps set.
    pub scheduler: DDIMScheduler,
    /// η and the clipped-ε̂ option of every step.
    pub options: DdimStepOptions,
}

impl Scheduler for DdimSampler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.scheduler
            .timesteps()
            .iter()
            .map(|&t| t as f64)
            .collect()
    }

    fn needs_noise(&self, _index: usize) -> bool {
        self.options.eta > 0.0
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let t = timestep_at(self.scheduler.timesteps(), index)?;
        self.scheduler
            .step(model_output, t, sample, &self.options, noise)
    }
}

/// `(1 - ᾱ_prev) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_prev)` in float32 (diffusers' expression order).
/// Zero when ᾱ_t = 1 would divide by zero (no noise at all at t).
fn variance(a_t: f32, a_prev: f32) -> f32 {
    let beta_prod_t = 1.0 - a_t;
    let beta_prod_t_prev = 1.0 - a_prev;
    if beta_prod_t <= 0.0 || a_prev <= 0.0 {
        return 0.0;
    }
    ((beta_prod_t_prev / beta_prod_t) * (1.0 - a_t / a_prev)).max(0.0)
}
