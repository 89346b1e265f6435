//! DDIM inversion, x_0 -> x_T: the deterministic DDIM update run forwards in time (the ODE view of
//! DDIM, Song et al. 2020 Sec. 4.3), following diffusers' `scheduling_ddim_inverse.py`
//! (`set_alpha_to_one` sets ᾱ before the first step, `steps_offset` shifts `leading` timesteps).
//! The level a step starts from is read off the timestep list, not computed as `t - T // N`.

use candle_core::Tensor;

use super::kernel::{self, StepCoefficients};
use super::{check_defined, position_in, spaced_timesteps, NoiseLevels, StepOutput};
use super::{timestep_at, Scheduler, SchedulerConfig};
use crate::Result;

/// The DDIM inverse scheduler. Its timesteps ascend; step `i` moves the sample from the noise
/// level of timestep `i - 1` (or the initial ᾱ) to that of timestep `i`, using the model's
/// output at timestep `i` as diffusers does.
///
/// ```
/// use ddim::scheduler::{DDIMInverseScheduler, SchedulerConfig};
/// let mut s = DDIMInverseScheduler::new(&SchedulerConfig::default())?;
/// s.set_timesteps(4)?;
/// assert_eq!(s.timesteps(), &[0, 250, 500, 750]);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DDIMInverseScheduler {
    config: SchedulerConfig,
    levels: NoiseLevels,
    /// ᾱ before the first step: 1 (`set_alpha_to_one`) or ᾱ_0.
    initial_alpha_cumprod: f32,
    timesteps: Vec<usize>,
}

impl DDIMInverseScheduler {
    /// Builds the scheduler from a config (DDIM, DDPM or DDIM-inverse keys).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let levels = NoiseLevels::new(config)?;
        let initial_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            levels.alphas_cumprod[0]
        };
        Ok(DDIMInverseScheduler {
            config: config.clone(),
            levels,
            initial_alpha_cumprod,
            timesteps: (0..config.num_train_timesteps).collect(),
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// ᾱ_t for t in 0..T.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.levels.alphas_cumprod
    }

    /// ᾱ before the first step.
    pub fn initial_alpha_cumprod(&self) -> f32 {
        self.initial_alpha_cumprod
    }

    /// Sets the inference timesteps: the sampling schedule of the same spacing, ascending.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let mut ts = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        ts.reverse();
        self.timesteps = ts;
        Ok(())
    }

    /// The timesteps visited, in order (ascending).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep a step to `timestep` starts from; `None` for the first step (initial ᾱ).
    pub fn start_timestep(&self, timestep: usize) -> Result<Option<usize>> {
        let i = position_in(&self.timesteps, timestep)?;
        Ok(i.checked_sub(1).map(|j| self.timesteps[j]))
    }

    /// One inversion step to the noise level of `timestep`:
    /// `x_next = sqrt(ᾱ_next) x̂0 + sqrt(1 - ᾱ_next) ε̂`, where x̂0 and ε̂ come from the model output
    /// at the current level ᾱ_cur.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        // 1. the level we come from, read off the schedule
        let a_cur = match self.start_timestep(timestep)? {
            Some(t) => self.levels.alpha_prod(t)?,
            None => self.initial_alpha_cumprod,
        };
        // 2. the level we go to
        let a_next = self.levels.alpha_prod(timestep)?;
        check_defined(self.config.prediction_type, timestep, a_cur)?;
        let k = StepCoefficients {
            prediction: self.config.prediction_type,
            sqrt_alpha_prod: a_cur.sqrt(),
            sqrt_beta_prod: (1.0 - a_cur).sqrt(),
            // diffusers' inverse scheduler only clips; it has no thresholding.
            clip: if self.config.clip_sample {
                kernel::Clip::Range(self.config.clip_sample_range as f32)
            } else {
                kernel::Clip::None
            },
            use_clipped_model_output: false,
            c_x0: a_next.sqrt(),
            c_eps: (1.0 - a_next).sqrt(),
            c_x: 0.0,
            noise_std: 0.0,
        };
        let (prev_sample, pred_original_sample) =
            kernel::fused_step(&k, model_output, sample, None)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}

impl Scheduler for DDIMInverseScheduler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.timesteps().iter().map(|&t| t as f64).collect()
    }

    /// Inversion is deterministic.
    fn needs_noise(&self, _index: usize) -> bool {
        false
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let t = timestep_at(DDIMInverseScheduler::timesteps(self), index)?;
        DDIMInverseScheduler::step(self, model_output, t, sample)
    }
}
