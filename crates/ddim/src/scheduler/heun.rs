//! Heun's second-order sampler (Karras et al. 2022, arXiv:2206.00364, Algorithm 1 without
//! churn), following diffusers' `HeunDiscreteScheduler`: an Euler step from σ_i to σ_{i+1},
//! then, with the model evaluated again at σ_{i+1}, the step is redone from x_i with the mean of
//! the two slopes. The last step (to σ = 0) is a plain Euler step.
//!
//! Each noise level but the first and last is visited twice, so N steps have 2N - 1 model
//! evaluations and `timesteps` reads `[t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]`. Even indices are
//! the Euler halves, odd indices the corrections; a correction needs the Euler half before it.

use candle_core::Tensor;

use super::euler::{
    check_spacing, div_scalar, index_error, predict_x0, scale_by_sigma, step_inputs, SigmaOptions,
    SigmaSchedule,
};
use super::{NoiseLevels, Scheduler, SchedulerConfig, SchedulerKind, StepOutput};
use crate::{Error, Result};

/// The Heun scheduler (deterministic, two model evaluations per step).
///
/// ```
/// use ddim::scheduler::{HeunDiscreteScheduler, Scheduler, SchedulerKind};
/// let mut s = HeunDiscreteScheduler::new(&SchedulerKind::HeunDiscrete.defaults())?;
/// s.set_timesteps(3)?;
/// assert_eq!(s.model_timesteps(), vec![999.0, 499.5, 499.5, 0.0, 0.0]);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HeunDiscreteScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// Timesteps and sigmas with the inner levels repeated (2N - 1 and 2N entries).
    schedule: SigmaSchedule,
    /// The Euler half of the step in progress.
    pending: Option<EulerHalf>,
}

#[derive(Clone, Debug)]
struct EulerHalf {
    index: usize,
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

impl HeunDiscreteScheduler {
    /// Builds the scheduler from a config (diffusers' class defaults are `beta_start` 0.00085
    /// and `beta_end` 0.012: see [`SchedulerKind::defaults`]).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        check_spacing(config, SchedulerKind::HeunDiscrete)?;
        // HeunDiscreteScheduler has no rescale_betas_zero_snr: a config that carries it from
        // another class does not change the betas (diffusers drops the key).
        let own = SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..config.clone()
        };
        let levels = NoiseLevels::new(&own)?;
        Ok(HeunDiscreteScheduler {
            config: own,
            alphas_cumprod: levels.alphas_cumprod,
            schedule: SigmaSchedule::default(),
            pending: None,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Sets `num_inference_steps` steps (2N - 1 model evaluations): σ interpolated at the
    /// timesteps of `timestep_spacing`, or Karras' schedule between the interpolated ends
    /// (`use_karras_sigmas`; Heun has no `sigma_min`/`sigma_max` keys), then 0.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let base = SigmaSchedule::new(
            &self.config,
            SchedulerKind::HeunDiscrete,
            &self.alphas_cumprod,
            num_inference_steps,
            SigmaOptions {
                karras: self.config.use_karras_sigmas.then_some((None, None)),
                ..SigmaOptions::default()
            },
        )?;
        base.check_steps()?;
        let n = base.timesteps.len();
        let mut timesteps = Vec::with_capacity(2 * n);
        let mut sigmas = Vec::with_capacity(2 * n + 1);
        for i in 0..n {
            let repeat = if i == 0 { 1 } else { 2 };
            timesteps.extend(std::iter::repeat_n(base.timesteps[i], repeat));
            sigmas.extend(std::iter::repeat_n(base.sigmas[i], repeat));
        }
        sigmas.push(base.sigmas[n]);
        self.schedule = SigmaSchedule { timesteps, sigmas };
        self.pending = None;
        Ok(())
    }

    /// The model's timestep input at each of the 2N - 1 evaluations (float32).
    pub fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    /// σ at each evaluation and after the last (2N entries, float32), as diffusers' `sigmas`.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// Whether `index` is the Euler half of a step (even) rather than its correction (odd).
    pub fn is_first_order(index: usize) -> bool {
        index.is_multiple_of(2)
    }

    /// x̂0 of the output at σ, clipped to ±`clip_sample_range` when `clip_sample` is set.
    fn x0(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let x0 = predict_x0(self.config.prediction_type, model_output, sample, sigma)?;
        Ok(if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.clamp(-r, r)?
        } else {
            x0
        })
    }

    /// Step `index`: the Euler half (even index) or the correction (odd index, after the
    /// Euler half `index - 1`).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let (_, _) = self.schedule.pair(index)?;
        let (model_output, sample) = step_inputs(model_output, sample)?;
        if Self::is_first_order(index) {
            let sigma = self.schedule.sigmas[index];
            let next = self.schedule.sigmas[index + 1];
            let x0 = self.x0(&model_output, &sample, sigma)?;
            let derivative = div_scalar(&(&sample - &x0)?, sigma)?;
            let dt = next - sigma;
            let prev_sample = (&sample + derivative.affine(dt as f64, 0.0)?)?;
            self.pending = Some(EulerHalf {
                index,
                derivative,
                dt,
                sample,
            });
            Ok(StepOutput {
                prev_sample,
                pred_original_sample: x0,
            })
        } else {
            let half = match self.pending.take() {
                Some(h) if h.index + 1 == index => h,
                other => {
                    self.pending = other;
                    return Err(Error::argument(
                        "index",
                        index,
                        format!(
                            "is the second half of a Heun step: run step {} (its Euler half) \
                             just before it",
                            index - 1
                        ),
                    ));
                }
            };
            // The model was evaluated at σ_{i+1}, where the Euler half landed.
            let next = self.schedule.sigmas[index];
            let x0 = self.x0(&model_output, &sample, next)?;
            let slope = div_scalar(&(&sample - &x0)?, next)?;
            let derivative = ((half.derivative + slope)? / 2.0)?;
            let prev_sample = (&half.sample + derivative.affine(half.dt as f64, 0.0)?)?;
            Ok(StepOutput {
                prev_sample,
                pred_original_sample: x0,
            })
        }
    }
}

impl Scheduler for HeunDiscreteScheduler {
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
        match self.schedule.sigmas.get(index) {
            Some(&sigma) if index < self.schedule.timesteps.len() => scale_by_sigma(sample, sigma),
            _ => Err(index_error(index, self.schedule.timesteps.len())),
        }
    }

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
        HeunDiscreteScheduler::step(self, model_output, index, sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn scheduler(n: usize) -> HeunDiscreteScheduler {
        let mut s = HeunDiscreteScheduler::new(&SchedulerKind::HeunDiscrete.defaults()).unwrap();
        s.set_timesteps(n).unwrap();
        s
    }

    #[test]
    fn layout_repeats_the_inner_levels() {
        let s = scheduler(4);
        assert_eq!(s.timesteps().len(), 7);
        assert_eq!(s.sigmas().len(), 8);
        assert_eq!(s.timesteps()[1], s.timesteps()[2]);
        assert_eq!(s.sigmas()[1], s.sigmas()[2]);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        // "linspace" spacing with one step is np.linspace(0, 999, 1) = [0], as in diffusers.
        let one = scheduler(1);
        assert_eq!(one.timesteps(), &[0.0]);
    }

    #[test]
    fn a_correction_needs_its_euler_half() {
        let mut s = scheduler(3);
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&x, 1, &x).is_err());
        s.step(&x, 0, &x).unwrap();
        assert!(s.step(&x, 3, &x).is_err());
        // The failed call kept the Euler half.
        s.step(&x, 1, &x).unwrap();
        assert!(s.step(&x, 5, &x).is_err());
        assert!(s.scale_model_input(&x, 5).is_err());
        let mut z = HeunDiscreteScheduler::new(&SchedulerKind::HeunDiscrete.defaults()).unwrap();
        assert!(z.set_timesteps(0).is_err());
    }

    #[test]
    fn heun_is_exact_for_a_linear_denoiser() {
        // D(x; σ) = 0 (x̂0 = 0, ε̂ = x / σ): the ODE is dx/dσ = x / σ, so x scales with σ, and
        // both Euler and Heun follow it exactly.
        let mut s = scheduler(3);
        let x0 = Tensor::new(&[2.0f32], &Device::Cpu).unwrap();
        let mut x = x0.affine(s.sigmas()[0] as f64, 0.0).unwrap();
        for i in 0..s.timesteps().len() {
            // The model is evaluated at σ_i of evaluation i, first or second half alike.
            let eps = (&x / s.sigmas()[i] as f64).unwrap();
            x = s.step(&eps, i, &x).unwrap().prev_sample;
        }
        let v = x.to_vec1::<f32>().unwrap()[0];
        assert!(v.abs() < 1e-4, "{v}");
    }
}
