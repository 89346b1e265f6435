//! DPM-Solver and DPM-Solver++ multistep samplers (Lu et al. 2022, arXiv:2206.00927, and Lu et
//! al. 2022, arXiv:2211.01095), at parity with diffusers' `DPMSolverMultistepScheduler`: orders
//! 1–3, the midpoint and Heun second-order rules, the SDE variants, Karras and log-SNR-uniform
//! sigmas, `lambda_min_clipped`, and the final-step order reductions.
//!
//! The solvers work in the half log-SNR λ = log α_t - log σ_t of the variance-preserving process.
//! With h = λ_t - λ_s, DPM-Solver++ (first order) is
//!
//! ```text
//! x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) x̂0(x_s)
//! ```
//!
//! and the higher orders add finite differences of the last two or three model outputs. The
//! scalar coefficients are computed in float64 (diffusers computes them in float32, where
//! e^{-h} - 1 loses digits for small h); the tensors stay float32.

use candle_core::{DType, Tensor};

use super::kernel::{apply_clip, Clip};
use super::sigmas::{self, alpha_sigma};
use super::{
    AlgorithmType, FinalSigmasType, NoiseLevels, PredictionType, Scheduler, SchedulerConfig,
    SolverType, StepOutput, TimestepSpacing,
};
use crate::schedule::BetaSchedule;
use crate::{Error, Result};

/// DPM-Solver(++) multistep, set to a number of inference steps.
///
/// ```
/// use ddim::scheduler::{DPMSolverMultistepScheduler, SchedulerKind, Scheduler};
/// let s = DPMSolverMultistepScheduler::new(&SchedulerKind::DpmSolverMultistep.defaults(), 5)?;
/// assert_eq!(s.model_timesteps(), vec![999.0, 799.0, 599.0, 400.0, 200.0]);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DPMSolverMultistepScheduler {
    config: SchedulerConfig,
    /// The algorithm after diffusers' renaming (`deis` runs DPM-Solver++).
    algorithm: AlgorithmType,
    /// `Midpoint` or `Heun` after diffusers' renaming (`logrho`, `bh1`, `bh2` run midpoint).
    solver_type: SolverType,
    timesteps: Vec<usize>,
    /// σ of every step and the one after the last, float32 values as diffusers keeps them.
    sigmas: Vec<f32>,
    /// The converted model outputs of the last steps, oldest first (at most `solver_order`).
    history: Vec<Tensor>,
    /// How many steps have run (diffusers' `lower_order_nums`, capped at the order).
    lower_order_nums: usize,
    /// The index the next `step` must have.
    next_index: usize,
}

impl DPMSolverMultistepScheduler {
    /// Builds the scheduler from a config and sets `num_inference_steps` (diffusers'
    /// `__init__` + `set_timesteps`). Options diffusers refuses are refused here, naming the key.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let algorithm = match config.algorithm_type {
            AlgorithmType::Deis => AlgorithmType::DpmSolverPlusPlus,
            other => other,
        };
        let solver_type = match config.solver_type {
            SolverType::Heun => SolverType::Heun,
            _ => SolverType::Midpoint,
        };
        if !(1..=3).contains(&config.solver_order) {
            return Err(Error::config(
                "solver_order",
                config.solver_order,
                "must be 1, 2 or 3",
            ));
        }
        let data_prediction = matches!(
            algorithm,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        );
        if !data_prediction && config.final_sigmas_type == FinalSigmasType::Zero {
            return Err(Error::config(
                "final_sigmas_type",
                "\"zero\"",
                format!(
                    "is not supported with algorithm_type {algorithm} (its last step would divide \
                     by σ = 0); use \"sigma_min\", or algorithm_type dpmsolver++"
                ),
            ));
        }
        if algorithm == AlgorithmType::SdeDpmSolver && config.solver_order == 3 {
            return Err(Error::config(
                "solver_order",
                3,
                "sde-dpmsolver has first- and second-order updates only (diffusers 0.42 fails at \
                 its third step); use solver_order 2 or sde-dpmsolver++",
            ));
        }
        let levels = NoiseLevels::new(config)?;
        let mut alphas_cumprod = levels.alphas_cumprod;
        if config.rescale_betas_zero_snr {
            // As diffusers: close to 0 without being 0, so that the first σ is finite.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let (timesteps, sigmas) = schedule(config, &alphas_cumprod, num_inference_steps)?;
        Ok(DPMSolverMultistepScheduler {
            config: config.clone(),
            algorithm,
            solver_type,
            timesteps,
            sigmas,
            history: Vec::new(),
            lower_order_nums: 0,
            next_index: 0,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn is_sde(&self) -> bool {
        matches!(
            self.algorithm,
            AlgorithmType::SdeDpmSolver | AlgorithmType::SdeDpmSolverPlusPlus
        )
    }

    fn data_prediction(&self) -> bool {
        matches!(
            self.algorithm,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        )
    }

    /// The model output as the solver integrates it: x̂0 for DPM-Solver++, ε̂ for DPM-Solver
    /// (diffusers' `convert_model_output`); and x̂0 in both cases, for the step's output.
    fn convert(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        index: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index] as f64);
        let m = model_output;
        let x = sample;
        let threshold = |x0: Tensor| -> Result<Tensor> {
            if self.config.thresholding {
                apply_clip(
                    x0,
                    Clip::Dynamic {
                        ratio: self.config.dynamic_thresholding_ratio as f32,
                        max: self.config.sample_max_value as f32,
                    },
                )
            } else {
                Ok(x0)
            }
        };
        if self.data_prediction() {
            let x0 = match self.config.prediction_type {
                PredictionType::Epsilon => ((x - m.affine(sigma, 0.0)?)? / alpha)?,
                PredictionType::Sample => m.clone(),
                PredictionType::VPrediction => (x.affine(alpha, 0.0)? - m.affine(sigma, 0.0)?)?,
            };
            let x0 = threshold(x0)?;
            Ok((x0.clone(), x0))
        } else {
            let eps = match self.config.prediction_type {
                PredictionType::Epsilon => m.clone(),
                PredictionType::Sample => ((x - m.affine(alpha, 0.0)?)? / sigma)?,
                PredictionType::VPrediction => (m.affine(alpha, 0.0)? + x.affine(sigma, 0.0)?)?,
            };
            let x0 = ((x - eps.affine(sigma, 0.0)?)? / alpha)?;
            if self.config.thresholding {
                let x0 = threshold(x0)?;
                let eps = ((x - x0.affine(alpha, 0.0)?)? / sigma)?;
                Ok((eps, x0))
            } else {
                Ok((eps, x0))
            }
        }
    }

    /// The order of step `index`: lowered at the start (not enough history) and, as diffusers
    /// does, at the last steps of short runs and before a final σ = 0.
    fn order_at(&self, index: usize) -> usize {
        let n = self.timesteps.len();
        let c = &self.config;
        let last_first_order = index + 1 == n
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let second_last = index + 2 == n && c.lower_order_final && n < 15;
        if c.solver_order == 1 || self.lower_order_nums < 1 || last_first_order {
            1
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || second_last {
            2
        } else {
            3
        }
    }

    /// The update from `sample` at step `index` with the given order; `m` holds the history,
    /// newest last.
    fn update(
        &self,
        order: usize,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let m = &self.history;
        let newest = m.len() - 1;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1] as f64);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index] as f64);
        let lambda = |i: usize| sigmas::lambda(self.sigmas[i] as f64);
        let h = lambda(index + 1) - lambda(index);
        // The differences D1 (and D2) of the history, as tensors.
        let (d0, d1, d2) = match order {
            1 => (m[newest].clone(), None, None),
            2 => {
                let r0 = (lambda(index) - lambda(index - 1)) / h;
                let d1 = ((&m[newest] - &m[newest - 1])? / r0)?;
                (m[newest].clone(), Some(d1), None)
            }
            _ => {
                let r0 = (lambda(index) - lambda(index - 1)) / h;
                let r1 = (lambda(index - 1) - lambda(index - 2)) / h;
                let d1_0 = ((&m[newest] - &m[newest - 1])? / r0)?;
                let d1_1 = ((&m[newest - 1] - &m[newest - 2])? / r1)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + diff.affine(r0 / (r0 + r1), 0.0)?)?;
                let d2 = diff.affine(1.0 / (r0 + r1), 0.0)?;
                (m[newest].clone(), Some(d1), Some(d2))
            }
        };
        let em1_neg = (-h).exp_m1(); // e^{-h} - 1
        let em1_pos = h.exp_m1(); // e^{h} - 1
        let em1_neg2 = (-2.0 * h).exp_m1(); // e^{-2h} - 1
        let heun = self.solver_type == SolverType::Heun || order == 3;
        // (coefficient of x, of D0, of D1, of D2, of the noise)
        let (cx, c0, c1, c2, cz) = match self.algorithm {
            AlgorithmType::DpmSolver => (
                alpha_t / alpha_s0,
                -sigma_t * em1_pos,
                if heun {
                    -sigma_t * (em1_pos / h - 1.0)
                } else {
                    -0.5 * sigma_t * em1_pos
                },
                -sigma_t * ((em1_pos - h) / (h * h) - 0.5),
                0.0,
            ),
            AlgorithmType::SdeDpmSolver => (
                alpha_t / alpha_s0,
                -2.0 * sigma_t * em1_pos,
                if heun {
                    -2.0 * sigma_t * (em1_pos / h - 1.0)
                } else {
                    -sigma_t * em1_pos
                },
                0.0,
                sigma_t * (2.0 * h).exp_m1().sqrt(),
            ),
            AlgorithmType::SdeDpmSolverPlusPlus => (
                sigma_t / sigma_s0 * (-h).exp(),
                -alpha_t * em1_neg2,
                if heun {
                    alpha_t * (-em1_neg2 / (-2.0 * h) + 1.0)
                } else {
                    -0.5 * alpha_t * em1_neg2
                },
                alpha_t * ((-em1_neg2 - 2.0 * h) / (4.0 * h * h) - 0.5),
                sigma_t * (-em1_neg2).sqrt(),
            ),
            // DPM-Solver++ (and `deis`, which diffusers runs as DPM-Solver++).
            _ => (
                sigma_t / sigma_s0,
                -alpha_t * em1_neg,
                if heun {
                    alpha_t * (em1_neg / h + 1.0)
                } else {
                    -0.5 * alpha_t * em1_neg
                },
                -alpha_t * ((em1_neg + h) / (h * h) - 0.5),
                0.0,
            ),
        };
        let mut prev = (sample.affine(cx, 0.0)? + d0.affine(c0, 0.0)?)?;
        if let Some(d1) = d1 {
            prev = (prev + d1.affine(c1, 0.0)?)?;
        }
        if let Some(d2) = d2 {
            prev = (prev + d2.affine(c2, 0.0)?)?;
        }
        if self.is_sde() {
            let z = noise.ok_or_else(|| {
                Error::argument(
                    "noise",
                    "None",
                    format!("{} adds noise at every step", self.algorithm),
                )
            })?;
            super::same_shape("noise", z, sample)?;
            prev = (prev + z.to_dtype(DType::F32)?.affine(cz, 0.0)?)?;
        }
        Ok(prev)
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.timesteps.iter().map(|&t| t as f64).collect()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
    }

    fn needs_noise(&self, _index: usize) -> bool {
        self.is_sde()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        if index != self.next_index || index >= self.timesteps.len() {
            return Err(Error::argument(
                "index",
                index,
                format!(
                    "a multistep solver runs its {} steps in order; the next one is {}",
                    self.timesteps.len(),
                    self.next_index
                ),
            ));
        }
        super::same_shape("model_output", model_output, sample)?;
        let dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let (converted, x0) = self.convert(&model_output, &sample, index)?;
        self.history.push(converted);
        if self.history.len() > self.config.solver_order {
            self.history.remove(0);
        }
        let order = self.order_at(index);
        let prev = self.update(order, index, &sample, noise)?;
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_index += 1;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: x0.to_dtype(dtype)?,
        })
    }
}

/// diffusers' `set_timesteps`: the model timesteps and the N + 1 sigmas.
fn schedule(
    config: &SchedulerConfig,
    alphas_cumprod: &[f32],
    n: usize,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t_train = config.num_train_timesteps;
    if n == 0 || n > t_train {
        return Err(Error::argument(
            "num_inference_steps",
            n,
            format!("must be between 1 and num_train_timesteps = {t_train}"),
        ));
    }
    // The timesteps whose λ falls below lambda_min_clipped are cut off the top of the schedule
    // (for the cosine schedule, whose last λ are very negative).
    let clip = config.lambda_min_clipped as f32;
    let clipped = alphas_cumprod
        .iter()
        .filter(|&&a| {
            let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
            lambda < clip
        })
        .count();
    let last = t_train - clipped;
    let timesteps: Vec<f64> =
        match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = sigmas::linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let step = -(t_train as f64 / n as f64);
                let start = last as f64;
                let delta = (start + step) - start;
                let count = (start / -step).ceil() as usize;
                (0..count)
                    .map(|i| (start + i as f64 * delta).round_ties_even() - 1.0)
                    .collect()
            }
            TimestepSpacing::Quad => return Err(Error::config(
                "timestep_spacing",
                "\"quad\"",
                "DPMSolverMultistepScheduler takes linspace, leading or trailing (quad is DDIM's)",
            )),
        };
    let train_sigmas = sigmas::training_sigmas(alphas_cumprod);
    let log_sigmas = sigmas::log_sigmas(&train_sigmas);
    // diffusers rounds the timesteps of Karras / log-SNR sigmas, except for the cosine schedule,
    // where it truncates them (by the cast to int64).
    let to_t = |s: f64| {
        let t = sigmas::sigma_to_t(s, &log_sigmas);
        if config.beta_schedule == BetaSchedule::SquaredcosCapV2 {
            t.trunc()
        } else {
            t.round_ties_even()
        }
    };
    let (timesteps, mut step_sigmas): (Vec<f64>, Vec<f64>) = if config.use_karras_sigmas {
        let min = train_sigmas[0] as f64;
        let max = train_sigmas[t_train - 1] as f64;
        let s = sigmas::karras(min, max, n);
        (s.iter().map(|&s| to_t(s)).collect(), s)
    } else if config.use_lu_lambdas {
        let (lo, hi) = (log_sigmas[0] as f64, log_sigmas[t_train - 1] as f64);
        let s: Vec<f64> = sigmas::linspace(0.0, 1.0, n)
            .into_iter()
            .map(|ramp| (hi + ramp * (lo - hi)).exp())
            .collect();
        (s.iter().map(|&s| to_t(s)).collect(), s)
    } else {
        let s = sigmas::interp(&timesteps, &train_sigmas);
        (timesteps, s)
    };
    step_sigmas.push(match config.final_sigmas_type {
        FinalSigmasType::SigmaMin => train_sigmas[0] as f64,
        FinalSigmasType::Zero => 0.0,
    });
    let timesteps = timesteps
        .into_iter()
        .map(|t| {
            if t >= 0.0 && t < t_train as f64 {
                Ok(t as usize)
            } else {
                Err(Error::argument(
                    "num_inference_steps",
                    n,
                    format!(
                        "gives timestep {t}, outside the training timesteps 0..{t_train} \
                         (steps_offset {})",
                        config.steps_offset
                    ),
                ))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((
        timesteps,
        step_sigmas.into_iter().map(|s| s as f32).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SchedulerKind;
    use candle_core::Device;

    fn defaults() -> SchedulerConfig {
        SchedulerKind::DpmSolverMultistep.defaults()
    }

    #[test]
    fn refuses_what_diffusers_refuses_and_runs_in_order() {
        for (config, key) in [
            (
                SchedulerConfig {
                    solver_order: 4,
                    ..defaults()
                },
                "solver_order",
            ),
            (
                SchedulerConfig {
                    algorithm_type: AlgorithmType::DpmSolver,
                    ..defaults()
                },
                "final_sigmas_type",
            ),
            (
                SchedulerConfig {
                    algorithm_type: AlgorithmType::SdeDpmSolver,
                    final_sigmas_type: FinalSigmasType::SigmaMin,
                    solver_order: 3,
                    ..defaults()
                },
                "solver_order",
            ),
        ] {
            let e = DPMSolverMultistepScheduler::new(&config, 10).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        assert!(DPMSolverMultistepScheduler::new(&defaults(), 0).is_err());
        assert!(DPMSolverMultistepScheduler::new(&defaults(), 1001).is_err());
        let mut s = DPMSolverMultistepScheduler::new(&defaults(), 4).unwrap();
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&x, 1, &x, None).is_err());
        s.step(&x, 0, &x, None).unwrap();
        assert!(s.step(&x, 0, &x, None).is_err());
    }

    #[test]
    fn last_step_lands_on_x0_and_the_sde_needs_noise() {
        // With a final σ = 0, the last (first-order) step returns x̂0 itself.
        let mut s = DPMSolverMultistepScheduler::new(&defaults(), 1).unwrap();
        let x = Tensor::new(&[[[[0.5f32, -1.0]]]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[[[0.1f32, 0.2]]]], &Device::Cpu).unwrap();
        let out = s.step(&eps, 0, &x, None).unwrap();
        let d = (out.prev_sample - out.pred_original_sample)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let sde = SchedulerConfig {
            algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
            ..defaults()
        };
        let mut s = DPMSolverMultistepScheduler::new(&sde, 2).unwrap();
        assert!(s.needs_noise(0) && s.needs_noise(1));
        let e = s.step(&eps, 0, &x, None).unwrap_err();
        assert!(e.to_string().contains("noise"), "{e}");
    }
}
