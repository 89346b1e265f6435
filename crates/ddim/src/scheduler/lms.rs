//! Linear multistep sampling in σ (k-diffusion's `sample_lms`, Crowson 2022; the Adams–Bashforth
//! idea applied to the probability-flow ODE `dx/dσ = (x - x̂0) / σ` of Karras et al. 2022),
//! following diffusers' `LMSDiscreteScheduler` with its pipelines' default order 4.
//!
//! Step i keeps the slopes d_i, d_{i-1}, ... of the last `order` steps (fewer at the start) and
//! moves `x_{i+1} = x_i + Σ_k c_k d_{i-k}`, where c_k integrates the Lagrange basis polynomial of
//! node σ_{i-k} (over the nodes σ_i, ..., σ_{i-order+1}) from σ_i to σ_{i+1}. diffusers
//! integrates it numerically (`scipy.integrate.quad`); these polynomials of degree < 4 are
//! integrated exactly here, which agrees to float rounding.

use std::collections::VecDeque;

use candle_core::Tensor;

use super::euler::{
    check_spacing, div_scalar, predict_x0, step_inputs, SigmaOptions, SigmaSchedule,
};
use super::{NoiseLevels, Scheduler, SchedulerConfig, SchedulerKind, StepOutput};
use crate::{Error, Result};

/// The order diffusers' pipelines run LMS at (`step(order=4)`'s default).
pub const LMS_ORDER: usize = 4;

/// The LMS scheduler (deterministic, multistep).
///
/// ```
/// use ddim::scheduler::{LMSDiscreteScheduler, SchedulerKind};
/// let mut s = LMSDiscreteScheduler::new(&SchedulerKind::LmsDiscrete.defaults())?;
/// s.set_timesteps(10)?;
/// // The first step has one slope: an Euler step.
/// let c = s.coefficients(0)?;
/// assert_eq!(c.len(), 1);
/// assert!((c[0] - (s.sigmas()[1] - s.sigmas()[0]) as f64).abs() < 1e-9);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LMSDiscreteScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    schedule: SigmaSchedule,
    /// The slopes of the last steps, the newest first.
    derivatives: VecDeque<Tensor>,
    /// The step the history is ready for.
    next_index: usize,
}

impl LMSDiscreteScheduler {
    /// Builds the scheduler from a config.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        check_spacing(config, SchedulerKind::LmsDiscrete)?;
        // LMSDiscreteScheduler has no rescale_betas_zero_snr key: one carried over from another
        // class's config does not change the betas (diffusers drops it).
        let own = SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..config.clone()
        };
        let levels = NoiseLevels::new(&own)?;
        Ok(LMSDiscreteScheduler {
            config: own,
            alphas_cumprod: levels.alphas_cumprod,
            schedule: SigmaSchedule::default(),
            derivatives: VecDeque::new(),
            next_index: 0,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Sets `num_inference_steps` steps: σ interpolated at the timesteps of `timestep_spacing`,
    /// or Karras' schedule between the interpolated ends (`use_karras_sigmas`), then 0.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let schedule = SigmaSchedule::new(
            &self.config,
            SchedulerKind::LmsDiscrete,
            &self.alphas_cumprod,
            num_inference_steps,
            SigmaOptions {
                karras: self.config.use_karras_sigmas.then_some((None, None)),
                ..SigmaOptions::default()
            },
        )?;
        schedule.check_steps()?;
        self.schedule = schedule;
        self.derivatives.clear();
        self.next_index = 0;
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

    /// The coefficients c_0, c_1, ... of step `index` (c_k multiplies the slope of step
    /// `index - k`), order min(index + 1, 4).
    pub fn coefficients(&self, index: usize) -> Result<Vec<f64>> {
        let (sigma, next) = self.schedule.pair(index)?;
        let order = (index + 1).min(LMS_ORDER);
        let nodes: Vec<f64> = (0..order)
            .map(|k| self.schedule.sigmas[index - k] as f64)
            .collect();
        let coeffs: Vec<f64> = (0..order)
            .map(|k| lagrange_integral(&nodes, k, sigma as f64, next as f64))
            .collect();
        if coeffs.iter().any(|c| !c.is_finite()) {
            return Err(Error::argument(
                "index",
                index,
                format!(
                    "the LMS coefficients of this step are undefined: two of the noise levels \
                     {nodes:?} coincide"
                ),
            ));
        }
        Ok(coeffs)
    }

    /// Step `index` (steps run in order from 0; step 0 starts a new run).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let (sigma, _) = self.schedule.pair(index)?;
        if index == 0 {
            self.derivatives.clear();
            self.next_index = 0;
        }
        if index != self.next_index {
            return Err(Error::argument(
                "index",
                index,
                format!(
                    "LMS steps run in order: the next step is {} (or 0 to start over)",
                    self.next_index
                ),
            ));
        }
        let coeffs = self.coefficients(index)?;
        let (model_output, sample) = step_inputs(model_output, sample)?;
        let x0 = predict_x0(self.config.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div_scalar(&(&sample - &x0)?, sigma)?;
        self.derivatives.push_front(derivative);
        self.derivatives.truncate(LMS_ORDER);
        let mut sum: Option<Tensor> = None;
        for (c, d) in coeffs.iter().zip(&self.derivatives) {
            let term = d.affine(*c, 0.0)?;
            sum = Some(match sum {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        let prev_sample = match sum {
            Some(s) => (&sample + s)?,
            None => sample.clone(),
        };
        self.next_index = index + 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}

/// ∫_a^b L_k(τ) dτ for the Lagrange basis polynomial L_k of `nodes` (1 at nodes[k], 0 at the
/// others), integrated exactly: the product is expanded in u = τ - a and integrated term by term.
pub fn lagrange_integral(nodes: &[f64], k: usize, a: f64, b: f64) -> f64 {
    // Coefficients of ∏_{j≠k} (u - (nodes[j] - a)), lowest power first.
    let mut poly = vec![1.0f64];
    let mut denom = 1.0f64;
    for (j, &node) in nodes.iter().enumerate() {
        if j == k {
            continue;
        }
        let root = node - a;
        let mut next = vec![0.0; poly.len() + 1];
        for (m, &c) in poly.iter().enumerate() {
            next[m + 1] += c;
            next[m] -= root * c;
        }
        poly = next;
        denom *= nodes[k] - node;
    }
    let h = b - a;
    let mut h_pow = h;
    let mut integral = 0.0;
    for (m, &c) in poly.iter().enumerate() {
        integral += c * h_pow / (m + 1) as f64;
        h_pow *= h;
    }
    integral / denom
}

impl Scheduler for LMSDiscreteScheduler {
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
        LMSDiscreteScheduler::step(self, model_output, index, sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn lagrange_integrals_match_simpson() {
        // Simpson's rule with many panels on the cubic basis polynomials.
        let nodes = [3.0, 5.5, 9.0, 14.0];
        let (a, b) = (3.0, 1.2);
        for k in 0..4 {
            let l = |t: f64| {
                (0..4)
                    .filter(|&j| j != k)
                    .map(|j| (t - nodes[j]) / (nodes[k] - nodes[j]))
                    .product::<f64>()
            };
            let n = 2000;
            let h = (b - a) / n as f64;
            let mut s = l(a) + l(b);
            for i in 1..n {
                s += l(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            let simpson = s * h / 3.0;
            let exact = lagrange_integral(&nodes, k, a, b);
            assert!((simpson - exact).abs() < 1e-10, "{k}: {simpson} {exact}");
        }
        // The coefficients of a step sum to the step length (the basis sums to 1).
        let total: f64 = (0..4).map(|k| lagrange_integral(&nodes, k, a, b)).sum();
        assert!((total - (b - a)).abs() < 1e-12);
    }

    #[test]
    fn steps_run_in_order() {
        let mut s = LMSDiscreteScheduler::new(&SchedulerKind::LmsDiscrete.defaults()).unwrap();
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&x, 0, &x).is_err()); // no timesteps yet
        assert!(s.set_timesteps(0).is_err());
        s.set_timesteps(5).unwrap();
        assert!(s.step(&x, 1, &x).is_err());
        s.step(&x, 0, &x).unwrap();
        assert!(s.step(&x, 2, &x).is_err());
        s.step(&x, 1, &x).unwrap();
        assert!(s.step(&x, 5, &x).is_err());
        assert_eq!(s.coefficients(4).unwrap().len(), 4);
        assert!(s.coefficients(5).is_err());
        // Starting over at 0 is allowed.
        s.step(&x, 0, &x).unwrap();
    }
}
