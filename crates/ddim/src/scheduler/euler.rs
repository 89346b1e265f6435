//! The Euler sampler of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
//! Generative Models", arXiv:2206.00364, Algorithm 2 without churn): one Euler step of the
//! probability-flow ODE `dx/dσ = (x - D(x; σ)) / σ` per noise level, following diffusers'
//! `EulerDiscreteScheduler`.
//!
//! The module also holds what the discrete-sigma samplers (Euler, Euler ancestral, Heun, LMS)
//! share: the inference timesteps as diffusers lays them out (fractional for `linspace`), the
//! noise levels σ interpolated at them (or Karras' eq. 5 schedule), the model input scaling
//! `x / sqrt(σ² + 1)` and x̂0 from the model output at a noise level.
//!
//! Not implemented: the churn arguments of diffusers' `step` (`s_churn`, `s_tmin`, `s_tmax`,
//! `s_noise`); pipelines never pass them and their defaults add no noise, which is what runs here.

use candle_core::Tensor;

use super::sigmas::{interp, karras, linspace, log_sigmas, sigma_to_t, training_sigmas};
use super::{
    spaced_timesteps, FinalSigmasType, InterpolationType, NoiseLevels, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing, TimestepType,
};
use crate::{Error, Result};

/// The Euler scheduler: deterministic first-order steps in σ.
///
/// ```
/// use ddim::scheduler::{EulerDiscreteScheduler, SchedulerConfig, SchedulerKind};
/// let mut s = EulerDiscreteScheduler::new(&SchedulerKind::EulerDiscrete.defaults())?;
/// s.set_timesteps(4)?;
/// assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
/// assert_eq!(s.sigmas().len(), 5); // the last one is 0
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    levels: NoiseLevels,
    /// ᾱ_t as the sigmas are computed from it (the last one 2^-24 under zero terminal SNR).
    alphas_cumprod: Vec<f32>,
    schedule: SigmaSchedule,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from a config; errors name a key diffusers' Euler does not accept.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let kind = SchedulerKind::EulerDiscrete;
        check_spacing(config, kind)?;
        let levels = NoiseLevels::new(config)?;
        let alphas_cumprod = sigma_alphas_cumprod(&levels, config.rescale_betas_zero_snr);
        for (key, v) in [
            ("sigma_min", config.sigma_min),
            ("sigma_max", config.sigma_max),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::config(
                        key,
                        v,
                        "must be a positive number or null (the training schedule's)",
                    ));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (config.sigma_min, config.sigma_max) {
            if lo > hi {
                return Err(Error::config(
                    "sigma_min",
                    lo,
                    format!("must not exceed sigma_max = {hi}"),
                ));
            }
        }
        Ok(EulerDiscreteScheduler {
            config: config.clone(),
            levels,
            alphas_cumprod,
            schedule: SigmaSchedule::default(),
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// ᾱ_t for t in 0..T, as the noise levels are computed from it.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// β_t for t in 0..T.
    pub fn betas(&self) -> &[f32] {
        &self.levels.betas
    }

    /// Sets `num_inference_steps` steps: the timesteps of `timestep_spacing`, σ interpolated at
    /// them (`interpolation_type`) or Karras' schedule (`use_karras_sigmas`, between
    /// `sigma_min`/`sigma_max` or the interpolated ends), and the last σ (`final_sigmas_type`).
    ///
    /// As in diffusers, `interpolation_type = "log_linear"` gives N + 1 noise levels evenly
    /// spaced in log σ over the whole training range, whatever the spacing, before the final
    /// one; the N steps use the first N + 1 of them, so the run ends at the training schedule's
    /// smallest σ rather than 0.
    ///
    /// With `timestep_type = "continuous"` and a `v_prediction` model the model's timestep input
    /// is `0.25 ln σ` (EDM's c_noise); then there is a step for every σ but the last.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let karras = c.use_karras_sigmas.then_some((c.sigma_min, c.sigma_max));
        let mut schedule = SigmaSchedule::new(
            c,
            SchedulerKind::EulerDiscrete,
            &self.alphas_cumprod,
            num_inference_steps,
            SigmaOptions {
                log_linear: c.interpolation_type == InterpolationType::LogLinear,
                karras,
                final_sigma_min: c.final_sigmas_type == FinalSigmasType::SigmaMin,
            },
        )?;
        if c.timestep_type == TimestepType::Continuous
            && c.prediction_type == PredictionType::VPrediction
        {
            let n = schedule.sigmas.len() - 1;
            schedule.timesteps = schedule.sigmas[..n]
                .iter()
                .map(|&s| 0.25 * s.ln())
                .collect();
        }
        schedule.check_steps()?;
        self.schedule = schedule;
        Ok(())
    }

    /// The model's timestep input at each step (float32 values, as diffusers'
    /// `scheduler.timesteps`).
    pub fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    /// σ at each step and after the last (float32, as diffusers' `scheduler.sigmas`).
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// One Euler step from σ_i to σ_{i+1}: `x + (x - x̂0) / σ_i · (σ_{i+1} - σ_i)`.
    pub fn step(&self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<StepOutput> {
        let (sigma, next) = self.schedule.pair(index)?;
        let (model_output, sample) = step_inputs(model_output, sample)?;
        let x0 = predict_x0(self.config.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div_scalar(&(&sample - &x0)?, sigma)?;
        let prev_sample = (&sample + derivative.affine((next - sigma) as f64, 0.0)?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}

impl Scheduler for EulerDiscreteScheduler {
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
        EulerDiscreteScheduler::step(self, model_output, index, sample)
    }
}

// ---------------------------------------------------------------------------------------------
// What the discrete-sigma samplers share.

/// ᾱ_t as diffusers' Euler samplers compute σ from it: under zero terminal SNR the last ᾱ (0)
/// is replaced by 2^-24, so σ_T is about 4096 instead of infinite.
pub(crate) fn sigma_alphas_cumprod(levels: &NoiseLevels, zero_snr: bool) -> Vec<f32> {
    let mut ac = levels.alphas_cumprod.clone();
    if zero_snr {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    ac
}

/// σ_t of every training timestep as diffusers has them: [`training_sigmas`], except that the
/// zero-terminal-SNR ᾱ_T = 2^-24 gives σ_T = 4096 exactly. The correctly rounded float32
/// sqrt(2^24 - 1) is 4095.99976, but torch's float32 `** 0.5` returns 4096.0, and the first
/// step from σ_T cancels terms of size 2σ_T·|x| down to |x̂0|, so the last bit of σ_T shows
/// (5e-4 in the sample of a one-step run).
pub(crate) fn torch_training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    let mut train = training_sigmas(alphas_cumprod);
    for (s, &a) in train.iter_mut().zip(alphas_cumprod) {
        if a == 2f32.powi(-24) {
            *s = 4096.0;
        }
    }
    train
}

/// Refuses the `quad` spacing, which diffusers' discrete-sigma samplers do not have.
pub(crate) fn check_spacing(config: &SchedulerConfig, kind: SchedulerKind) -> Result<()> {
    if config.timestep_spacing == TimestepSpacing::Quad {
        return Err(Error::config(
            "timestep_spacing",
            "\"quad\"",
            format!(
                "{} supports linspace, leading and trailing",
                kind.class_name()
            ),
        ));
    }
    Ok(())
}

/// How a [`SigmaSchedule`] is built.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SigmaOptions {
    /// N + 1 sigmas evenly spaced in log σ over the training range (Euler's `log_linear`).
    pub log_linear: bool,
    /// Karras sigmas between (σ_min, σ_max), each the interpolated end when `None`.
    pub karras: Option<(Option<f64>, Option<f64>)>,
    /// The last σ is the training schedule's smallest instead of 0.
    pub final_sigma_min: bool,
}

/// The timesteps and noise levels of a discrete-sigma sampler: step i goes from `sigmas[i]` to
/// `sigmas[i + 1]` with the model evaluated at `timesteps[i]`. Both are float32, as diffusers
/// stores them.
#[derive(Clone, Debug, Default)]
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

impl SigmaSchedule {
    /// The timesteps of the spacing and the noise levels at them (see [`SigmaOptions`]).
    pub fn new(
        config: &SchedulerConfig,
        kind: SchedulerKind,
        alphas_cumprod: &[f32],
        n: usize,
        options: SigmaOptions,
    ) -> Result<Self> {
        let timesteps = spacing_timesteps(config, kind, n)?;
        let train = torch_training_sigmas(alphas_cumprod);
        let logs = log_sigmas(&train);
        let (first, last) = match (train.first(), train.last()) {
            (Some(&f), Some(&l)) => (f, l),
            _ => {
                return Err(Error::config(
                    "num_train_timesteps",
                    0,
                    "must be at least 1",
                ))
            }
        };
        let mut sigmas: Vec<f64> = if options.log_linear {
            // torch.linspace(log σ_max, log σ_min, N + 1).exp(), all in float32.
            crate::schedule::linspace_f32(last.ln() as f64, first.ln() as f64, n + 1)
                .into_iter()
                .map(|l| l.exp() as f64)
                .collect()
        } else {
            let ts: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
            interp(&ts, &train)
        };
        let mut timesteps = timesteps;
        if let Some((lo, hi)) = options.karras {
            let lo = lo.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = hi.unwrap_or(sigmas[0]);
            sigmas = karras(lo, hi, n);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &logs) as f32)
                .collect();
        }
        let final_sigma = if options.final_sigma_min { first } else { 0.0 };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(final_sigma);
        Ok(SigmaSchedule { timesteps, sigmas })
    }

    /// Refuses a schedule with a step from a σ that is not a positive finite number (x̂0 and the
    /// derivative divide by it), or to one that is not finite.
    pub fn check_steps(&self) -> Result<()> {
        let steps = self.timesteps.len();
        if self.sigmas.len() <= steps {
            return Err(Error::argument(
                "num_inference_steps",
                steps,
                "gives fewer noise levels than steps; this is a bug in ddim",
            ));
        }
        for (i, &s) in self.sigmas.iter().enumerate().take(steps + 1) {
            let ok = if i < steps {
                s.is_finite() && s > 0.0
            } else {
                s.is_finite() && s >= 0.0
            };
            if !ok {
                return Err(Error::argument(
                    "sigma",
                    s,
                    format!(
                        "the noise level of step {i} must be a positive finite number (the \
                         training schedule gives ᾱ = 0 or 1 there; check beta_schedule, \
                         trained_betas, sigma_min and sigma_max)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// (σ_i, σ_{i+1}) of step `index`, or an error naming the index.
    pub fn pair(&self, index: usize) -> Result<(f32, f32)> {
        match (self.timesteps.get(index), self.sigmas.get(index + 1)) {
            (Some(_), Some(&next)) => Ok((self.sigmas[index], next)),
            _ => Err(index_error(index, self.timesteps.len())),
        }
    }

    pub fn model_timesteps(&self) -> Vec<f64> {
        self.timesteps.iter().map(|&t| t as f64).collect()
    }

    pub fn sigmas_f64(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| s as f64).collect()
    }

    /// The largest σ, or sqrt(σ² + 1) for `leading` spacing (diffusers' `init_noise_sigma`).
    pub fn init_noise_sigma(&self, spacing: TimestepSpacing) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max);
        match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            _ => (max * max + 1.0).sqrt() as f64,
        }
    }

    /// `x / sqrt(σ_i² + 1)`, σ_i of step `index`.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (sigma, _) = self.pair(index)?;
        scale_by_sigma(sample, sigma)
    }
}

/// `x / sqrt(σ² + 1)` (float32 scalar arithmetic, as diffusers).
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    div_scalar(sample, (sigma * sigma + 1.0).sqrt())
}

/// `t / d` element by element (a true float division, as torch's `tensor / scalar`, not a
/// multiplication by the rounded reciprocal: the Euler family's steps cancel large terms, where
/// the last bit shows).
pub(crate) fn div_scalar(t: &Tensor, d: f32) -> Result<Tensor> {
    let d = Tensor::new(d, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&d)?)
}

/// The error for a step index past the schedule.
pub(crate) fn index_error(index: usize, steps: usize) -> Error {
    Error::argument(
        "index",
        index,
        format!("the schedule has {steps} steps: set_timesteps first, and index from 0"),
    )
}

/// The inference timesteps of the spacing, descending, as float32 (fractional for `linspace`):
/// `linspace(0, T - 1, N)`, `leading` (`arange(N) · (T // N) + steps_offset`) or `trailing`.
///
/// diffusers computes `trailing` with `np.arange(T, 0, -T / N)`, which for some N (61, 103,
/// 121, ... with T = 1000) yields N + 1 values, the last one -1; here there are always N.
pub(crate) fn spacing_timesteps(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    n: usize,
) -> Result<Vec<f32>> {
    let t_max = config.num_train_timesteps;
    match config.timestep_spacing {
        TimestepSpacing::Linspace => {
            if n == 0 {
                return Err(Error::argument(
                    "num_inference_steps",
                    n,
                    "must be at least 1",
                ));
            }
            Ok(linspace(0.0, (t_max - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect())
        }
        TimestepSpacing::Leading | TimestepSpacing::Trailing => {
            let ts = spaced_timesteps(config.timestep_spacing, t_max, n, config.steps_offset)?;
            if ts.len() != n {
                return Err(Error::argument(
                    "num_inference_steps",
                    n,
                    format!("gives repeated {} timesteps", config.timestep_spacing),
                ));
            }
            Ok(ts.into_iter().map(|t| t as f32).collect())
        }
        TimestepSpacing::Quad => {
            check_spacing(config, kind)?;
            Ok(Vec::new())
        }
    }
}

/// The model output and sample of a step, in the sample's dtype, or an error when their shapes
/// differ.
pub(crate) fn step_inputs(model_output: &Tensor, sample: &Tensor) -> Result<(Tensor, Tensor)> {
    if model_output.dims() != sample.dims() {
        return Err(Error::argument(
            "model_output",
            format!("a tensor of shape {:?}", model_output.dims()),
            format!("must have the sample's shape {:?}", sample.dims()),
        ));
    }
    let m = if model_output.dtype() == sample.dtype() {
        model_output.clone()
    } else {
        model_output.to_dtype(sample.dtype())?
    };
    Ok((m, sample.clone()))
}

/// x̂0 from the model output at noise level σ, in the σ parameterisation (x = x0 + σ ε):
/// epsilon `x - σ ε̂`, v `-σ / sqrt(σ² + 1) · v̂ + x / (σ² + 1)`, sample the output itself.
pub(crate) fn predict_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => (sample - model_output.affine(sigma as f64, 0.0)?)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            let c_out = -sigma / s2.sqrt();
            (model_output.affine(c_out as f64, 0.0)? + div_scalar(sample, s2)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn euler(config: SchedulerConfig, n: usize) -> Result<EulerDiscreteScheduler> {
        let mut s = EulerDiscreteScheduler::new(&config)?;
        s.set_timesteps(n)?;
        Ok(s)
    }

    fn defaults() -> SchedulerConfig {
        SchedulerKind::EulerDiscrete.defaults()
    }

    #[test]
    fn zero_steps_and_bad_indices_are_errors() {
        assert!(euler(defaults(), 0).is_err());
        let mut s = euler(defaults(), 3).unwrap();
        let x = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(Scheduler::step(&mut s, &x, 3, &x, None).is_err());
        assert!(s.scale_model_input(&x, 7).is_err());
        let wrong = Tensor::zeros((1, 1, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(Scheduler::step(&mut s, &wrong, 0, &x, None).is_err());
        // An unset scheduler has no steps.
        let mut unset = EulerDiscreteScheduler::new(&defaults()).unwrap();
        assert!(Scheduler::step(&mut unset, &x, 0, &x, None).is_err());
    }

    #[test]
    fn refuses_quad_spacing_and_bad_sigma_bounds() {
        let quad = SchedulerConfig {
            timestep_spacing: TimestepSpacing::Quad,
            ..defaults()
        };
        let e = EulerDiscreteScheduler::new(&quad).unwrap_err().to_string();
        assert!(e.contains("quad") && e.contains("linspace"), "{e}");
        for (lo, hi) in [
            (Some(-1.0), None),
            (Some(f64::NAN), None),
            (Some(5.0), Some(1.0)),
        ] {
            let c = SchedulerConfig {
                sigma_min: lo,
                sigma_max: hi,
                use_karras_sigmas: true,
                ..defaults()
            };
            assert!(EulerDiscreteScheduler::new(&c).is_err(), "{lo:?} {hi:?}");
        }
    }

    #[test]
    fn linspace_steps_may_exceed_the_training_steps() {
        // Fractional timesteps: diffusers allows N > T for linspace.
        let c = SchedulerConfig {
            num_train_timesteps: 10,
            ..defaults()
        };
        let s = euler(c, 25).unwrap();
        assert_eq!(s.timesteps().len(), 25);
        assert_eq!(s.timesteps()[0], 9.0);
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn the_last_step_lands_on_the_prediction() {
        // With final σ = 0 an epsilon model's last step returns x̂0 exactly.
        let mut s = euler(defaults(), 2).unwrap();
        let x = Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[0.5f32, 0.25]], &Device::Cpu).unwrap();
        let out = Scheduler::step(&mut s, &m, 1, &x, None).unwrap();
        let (p, x0) = (
            out.prev_sample.to_vec2::<f32>().unwrap(),
            out.pred_original_sample.to_vec2::<f32>().unwrap(),
        );
        for (a, b) in p[0].iter().zip(&x0[0]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn zero_terminal_snr_caps_the_largest_sigma() {
        let c = SchedulerConfig {
            rescale_betas_zero_snr: true,
            timestep_spacing: TimestepSpacing::Trailing,
            ..defaults()
        };
        let s = euler(c, 5).unwrap();
        assert!((s.sigmas()[0] - 4096.0).abs() < 1.0, "{}", s.sigmas()[0]);
    }
}
