//! Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`, Crowson 2022): an Euler
//! step of the probability-flow ODE down to σ_down followed by fresh noise of standard
//! deviation σ_up, with σ_down² + σ_up² = σ_next² and σ_up² = σ_next² (σ² - σ_next²) / σ² (the
//! DDPM posterior variance in the σ parameterisation). Follows diffusers'
//! `EulerAncestralDiscreteScheduler`: noise is drawn at every step, the last included (where
//! σ_up = 0), so the generator advances exactly as in diffusers.

use candle_core::Tensor;

use super::euler::{
    check_spacing, div_scalar, predict_x0, sigma_alphas_cumprod, step_inputs, SigmaOptions,
    SigmaSchedule,
};
use super::{NoiseLevels, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, StepOutput};
use crate::{Error, Result};

/// The ancestral Euler scheduler (stochastic).
///
/// ```
/// use ddim::scheduler::{EulerAncestralDiscreteScheduler, Scheduler, SchedulerKind};
/// let mut s = EulerAncestralDiscreteScheduler::new(&SchedulerKind::EulerAncestralDiscrete.defaults())?;
/// s.set_timesteps(10)?;
/// assert!(s.needs_noise(9)); // every step draws noise, as in diffusers
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    schedule: SigmaSchedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler from a config. diffusers implements only `epsilon` and
    /// `v_prediction` models here (`sample` raises `NotImplementedError`), so `sample` is
    /// refused.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let kind = SchedulerKind::EulerAncestralDiscrete;
        check_spacing(config, kind)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::config(
                "prediction_type",
                "\"sample\"",
                "EulerAncestralDiscreteScheduler supports epsilon and v_prediction (diffusers \
                 does not implement sample for it)",
            ));
        }
        let levels = NoiseLevels::new(config)?;
        let alphas_cumprod = sigma_alphas_cumprod(&levels, config.rescale_betas_zero_snr);
        Ok(EulerAncestralDiscreteScheduler {
            config: config.clone(),
            alphas_cumprod,
            schedule: SigmaSchedule::default(),
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Sets `num_inference_steps` steps: the timesteps of `timestep_spacing` and σ
    /// interpolated at them, then 0.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let schedule = SigmaSchedule::new(
            &self.config,
            SchedulerKind::EulerAncestralDiscrete,
            &self.alphas_cumprod,
            num_inference_steps,
            SigmaOptions::default(),
        )?;
        schedule.check_steps()?;
        self.schedule = schedule;
        Ok(())
    }

    /// The model's timestep input at each step (float32).
    pub fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    /// σ at each step and after the last (float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// (σ_up, σ_down) of the step from σ to σ_next (computed in float64 from the float32 σ;
    /// clamped at 0 where rounding would make a square root of a negative number).
    pub fn ancestral_sigmas(sigma: f32, next: f32) -> (f64, f64) {
        let (s, n) = (sigma as f64, next as f64);
        let up = (n * n * (s * s - n * n) / (s * s)).max(0.0).sqrt();
        let down = (n * n - up * up).max(0.0).sqrt();
        (up, down)
    }

    /// One ancestral step: `x + (x - x̂0) / σ · (σ_down - σ) + σ_up · noise`. `noise` (the
    /// sample's shape) is required.
    pub fn step(
        &self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let (sigma, next) = self.schedule.pair(index)?;
        let noise = noise.ok_or_else(|| {
            Error::argument(
                "noise",
                "None",
                format!("ancestral Euler step {index} needs noise of the sample's shape"),
            )
        })?;
        let (model_output, sample) = step_inputs(model_output, sample)?;
        let (noise, _) = step_inputs(noise, &sample)?;
        let x0 = predict_x0(self.config.prediction_type, &model_output, &sample, sigma)?;
        let (up, down) = Self::ancestral_sigmas(sigma, next);
        let derivative = div_scalar(&(&sample - &x0)?, sigma)?;
        let dt = (down as f32 - sigma) as f64;
        let prev = (&sample + derivative.affine(dt, 0.0)?)?;
        let prev_sample = (prev + noise.affine(up as f32 as f64, 0.0)?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.schedule.model_timesteps()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.schedule.sigmas_f64())
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma(self.config.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, index)
    }

    fn needs_noise(&self, index: usize) -> bool {
        index < self.schedule.timesteps.len()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        EulerAncestralDiscreteScheduler::step(self, model_output, index, sample, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn scheduler(n: usize) -> EulerAncestralDiscreteScheduler {
        let mut s =
            EulerAncestralDiscreteScheduler::new(&SchedulerKind::EulerAncestralDiscrete.defaults())
                .unwrap();
        s.set_timesteps(n).unwrap();
        s
    }

    #[test]
    fn refuses_sample_prediction_missing_noise_and_bad_indices() {
        let c = SchedulerConfig {
            prediction_type: PredictionType::Sample,
            ..SchedulerKind::EulerAncestralDiscrete.defaults()
        };
        let e = EulerAncestralDiscreteScheduler::new(&c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prediction_type") && e.contains("v_prediction"),
            "{e}"
        );
        let mut s = scheduler(4);
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(Scheduler::step(&mut s, &x, 0, &x, None).is_err());
        assert!(Scheduler::step(&mut s, &x, 4, &x, Some(&x)).is_err());
        assert!(!s.needs_noise(4));
        let mut s0 =
            EulerAncestralDiscreteScheduler::new(&SchedulerKind::EulerAncestralDiscrete.defaults())
                .unwrap();
        assert!(s0.set_timesteps(0).is_err());
    }

    #[test]
    fn ancestral_sigmas_split_the_next_variance() {
        let (up, down) = EulerAncestralDiscreteScheduler::ancestral_sigmas(10.0, 2.0);
        assert!((up * up + down * down - 4.0).abs() < 1e-12);
        assert_eq!(
            EulerAncestralDiscreteScheduler::ancestral_sigmas(3.0, 0.0),
            (0.0, 0.0)
        );
        // A tiny next σ far below σ never gives NaN.
        let (up, down) = EulerAncestralDiscreteScheduler::ancestral_sigmas(4096.0, 1e-3);
        assert!(up.is_finite() && down.is_finite());
    }
}
