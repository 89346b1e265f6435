//! DDPM ancestral sampling (Ho et al. 2020, eq. 6-7 and 15; learned variances from Nichol &
//! Dhariwal 2021, eq. 15), following diffusers' `scheduling_ddpm.py`, with fewer inference steps
//! than training steps or a custom timestep list.

use candle_core::{DType, Tensor};

use super::kernel::{self, StepCoefficients};
use super::{check_defined, clip_of, position_in, spaced_timesteps, NoiseLevels, StepOutput};
use super::{timestep_at, Scheduler, SchedulerConfig, VarianceType};
use crate::{Error, Result};

/// The DDPM scheduler: x_{t-1} ~ N(μ̃_t(x_t, x̂0), σ_t²) along the timestep list.
///
/// ```
/// use ddim::scheduler::{DDPMScheduler, SchedulerConfig};
/// let mut s = DDPMScheduler::new(&SchedulerConfig::default())?;
/// s.set_custom_timesteps(&[999, 500, 10])?;
/// assert_eq!(s.previous_timestep(500)?, Some(10));
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DDPMScheduler {
    config: SchedulerConfig,
    levels: NoiseLevels,
    timesteps: Vec<usize>,
}

impl DDPMScheduler {
    /// The variance of the ancestral step (`null` in the config is `fixed_small`, as in diffusers).
    fn variance_type(&self) -> VarianceType {
        self.config
            .variance_type
            .unwrap_or(VarianceType::FixedSmall)
    }

    /// Builds the scheduler from a config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let levels = NoiseLevels::new(config)?;
        Ok(DDPMScheduler {
            config: config.clone(),
            levels,
            timesteps: (0..config.num_train_timesteps).rev().collect(),
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

    /// ᾱ_t for t in 0..T.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.levels.alphas_cumprod
    }

    /// Sets `num_inference_steps` timesteps with the config's `timestep_spacing`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.timesteps = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        Ok(())
    }

    /// Sets an explicit timestep list; it must be strictly descending and start below T.
    pub fn set_custom_timesteps(&mut self, timesteps: &[usize]) -> Result<()> {
        let t_max = self.config.num_train_timesteps;
        if timesteps.is_empty() {
            return Err(Error::argument(
                "timesteps",
                "[]",
                "a non-empty, strictly descending list",
            ));
        }
        if let Some(w) = timesteps.windows(2).find(|w| w[1] >= w[0]) {
            return Err(Error::argument(
                "timesteps",
                format!("{timesteps:?}"),
                format!(
                    "must be strictly descending ({} is followed by {})",
                    w[0], w[1]
                ),
            ));
        }
        if timesteps[0] >= t_max {
            return Err(Error::argument(
                "timesteps",
                timesteps[0],
                format!("must start below num_train_timesteps = {t_max}"),
            ));
        }
        self.timesteps = timesteps.to_vec();
        Ok(())
    }

    /// The timesteps visited, in order (descending).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep after `timestep` in the schedule; `None` after the last one (ᾱ = 1).
    pub fn previous_timestep(&self, timestep: usize) -> Result<Option<usize>> {
        let i = position_in(&self.timesteps, timestep)?;
        Ok(self.timesteps.get(i + 1).copied())
    }

    /// (ᾱ_t, ᾱ_prev, β_t = 1 - ᾱ_t/ᾱ_prev, β̃_t clamped at 1e-20) at `timestep`.
    fn levels_at(&self, timestep: usize) -> Result<(f32, f32, f32, f32)> {
        let a_t = self.levels.alpha_prod(timestep)?;
        let a_prev = match self.previous_timestep(timestep)? {
            Some(p) => self.levels.alpha_prod(p)?,
            None => 1.0,
        };
        let current_beta_t = 1.0 - a_t / a_prev;
        let posterior = ((1.0 - a_prev) / (1.0 - a_t) * current_beta_t).max(1e-20);
        Ok((a_t, a_prev, current_beta_t, posterior))
    }

    /// The fixed variance σ_t² of the step at `timestep` (for the learned types: their bounds'
    /// `fixed_small` value). `fixed_*_log` give the same variance as `fixed_*`, through logs.
    pub fn variance(&self, timestep: usize) -> Result<f32> {
        let (_, _, beta, posterior) = self.levels_at(timestep)?;
        Ok(match self.variance_type() {
            VarianceType::FixedLarge | VarianceType::FixedLargeLog => beta,
            _ => posterior,
        })
    }

    /// One ancestral step from x_t to x_{prev} (eq. 7): `x_prev = μ̃_t(x_t, x̂0) + σ_t z`.
    ///
    /// With a learned variance type, `model_output` may carry 2·C channels (prediction, then
    /// variance); they are split here. `noise` (z, the sample's shape) is required for every
    /// timestep above 0, where diffusers adds noise.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let learned = matches!(
            self.variance_type(),
            VarianceType::Learned | VarianceType::LearnedRange
        );
        let c = sample.dim(1)?;
        let (model_output, predicted_variance) = if learned && model_output.dim(1)? == 2 * c {
            (
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            )
        } else {
            (model_output.clone(), None)
        };
        let (a_t, a_prev, current_beta_t, posterior) = self.levels_at(timestep)?;
        check_defined(self.config.prediction_type, timestep, a_t)?;
        let beta_prod_t = 1.0 - a_t;
        let beta_prod_t_prev = 1.0 - a_prev;
        let current_alpha_t = a_t / a_prev;
        // 6. noise at every t > 0, as diffusers does
        let noise = if timestep > 0 {
            Some(noise.ok_or_else(|| {
                Error::argument(
                    "noise",
                    "None",
                    format!(
                        "a DDPM step at timestep {timestep} > 0 needs noise of the sample's shape"
                    ),
                )
            })?)
        } else {
            None
        };
        // σ_t z: a scalar σ_t for the fixed types, per element for the learned ones.
        let (noise_std, noise) = match (noise, self.variance_type()) {
            (None, _) => (0.0, None),
            (Some(z), VarianceType::FixedSmall) => (posterior.sqrt(), Some(z.clone())),
            // exp(0.5 · log β̃) = sqrt(β̃); diffusers computes it through the log.
            (Some(z), VarianceType::FixedSmallLog) => {
                ((0.5 * posterior.ln()).exp(), Some(z.clone()))
            }
            (Some(z), VarianceType::FixedLarge) => (current_beta_t.sqrt(), Some(z.clone())),
            // diffusers returns log β_t here and then takes its square root (NaN, since
            // log β_t < 0); the variance the name means is β_t, so σ_t = exp(0.5 · log β_t).
            (Some(z), VarianceType::FixedLargeLog) => {
                ((0.5 * current_beta_t.ln()).exp(), Some(z.clone()))
            }
            (Some(z), VarianceType::Learned | VarianceType::LearnedRange) => {
                let pv = predicted_variance.as_ref().ok_or_else(|| {
                    Error::argument(
                        "model_output",
                        format!("{c} channels"),
                        format!(
                            "variance_type {} needs 2 x {c} channels (prediction, then variance)",
                            self.variance_type()
                        ),
                    )
                })?;
                let pv = pv.to_dtype(DType::F32)?;
                let std = if self.variance_type() == VarianceType::Learned {
                    // The model's output is the variance itself (diffusers); clamped at 0 so
                    // a slightly negative prediction gives no noise instead of NaN.
                    pv.relu()?.sqrt()?
                } else {
                    // log σ² = frac · log β_t + (1 - frac) · log β̃_t, frac = (v + 1) / 2
                    let min_log = posterior.ln() as f64;
                    let max_log = current_beta_t.ln() as f64;
                    let frac = pv.affine(0.5, 0.5)?;
                    let log_var = frac.affine(max_log - min_log, min_log)?;
                    log_var.affine(0.5, 0.0)?.exp()?
                };
                let scaled = (std * z.to_dtype(DType::F32)?)?.to_dtype(z.dtype())?;
                (1.0, Some(scaled))
            }
        };
        let k = StepCoefficients {
            prediction: self.config.prediction_type,
            sqrt_alpha_prod: a_t.sqrt(),
            sqrt_beta_prod: beta_prod_t.sqrt(),
            clip: clip_of(&self.config),
            use_clipped_model_output: false,
            // 4. μ̃_t = sqrt(ᾱ_prev) β_t / (1 - ᾱ_t) · x̂0 + sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t) · x_t
            c_x0: a_prev.sqrt() * current_beta_t / beta_prod_t,
            c_eps: 0.0,
            c_x: current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t,
            noise_std,
        };
        let model_output = model_output.contiguous()?;
        let (prev_sample, pred_original_sample) =
            kernel::fused_step(&k, &model_output, sample, noise.as_ref())?;
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
}

impl Scheduler for DDPMScheduler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.timesteps().iter().map(|&t| t as f64).collect()
    }

    /// Every step but the one at t = 0 adds noise, as diffusers does.
    fn needs_noise(&self, index: usize) -> bool {
        DDPMScheduler::timesteps(self)
            .get(index)
            .is_some_and(|&t| t > 0)
    }

    fn uses_model_variance(&self) -> bool {
        matches!(
            self.variance_type(),
            VarianceType::Learned | VarianceType::LearnedRange
        )
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let t = timestep_at(DDPMScheduler::timesteps(self), index)?;
        DDPMScheduler::step(self, model_output, t, sample, noise)
    }
}
