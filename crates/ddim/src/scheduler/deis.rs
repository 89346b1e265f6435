//! DEIS, the diffusion exponential integrator sampler (Zhang & Chen 2022, arXiv:2204.13902), at
//! parity with diffusers 0.42.1's `DEISMultistepScheduler`: the multistep "ρAB" rule of orders
//! 1 to 3 in log ρ (`solver_type = "logrho"`), `lower_order_final`, Karras sigmas, the
//! `linspace` / `leading` / `trailing` spacings, every prediction type and dynamic thresholding.
//! diffusers runs `algorithm_type` `dpmsolver` / `dpmsolver++` as `deis` and every solver type
//! (`midpoint`, `heun`, `bh1`, `bh2`) as `logrho`; so does this module.
//!
//! DEIS integrates the probability-flow ODE in ρ = σ_t / α_t (the variance-exploding σ) on the
//! noise prediction ε̂ (the model output converted, after thresholding of x̂0):
//!
//! ```text
//! x_t / α_t = x_s0 / α_s0 + ∫_{ρ_s0}^{ρ_t} ε̂(ρ) dρ
//! ```
//!
//! with ε̂ interpolated by the Lagrange polynomial in u = log ρ through the last one, two or
//! three outputs (DEIS eq. 14 with the "log-ρ" time change). The weight of output k is
//! ∫ e^u L_k(u) du from u_s0 to u_t, in closed form (the antiderivative of e^u · P(u) is
//! e^u · (P - P' + P'' - ...)). The first-order step is DDIM,
//! x_t = (α_t / α_s0) x_s0 - σ_t (e^h - 1) ε̂ with h = λ_t - λ_s0. Coefficients are computed in float64 from diffusers'
//! float32 sigmas (diffusers evaluates them in float32, with cancellation between the two ends);
//! the tensors stay float32.
//!
//! DEIS has no `final_sigmas_type`: the last sigma is the training σ at t = 0 (Karras: σ_min
//! again, a last step of length 0, which is the identity).

use candle_core::{DType, Tensor};

use super::kernel::{self, Clip, StepCoefficients};
use super::sigmas::{self, alpha_sigma};
use super::unipc::{alpha_sigma_f32, check_index, combine, multistep_schedule};
use super::{
    AlgorithmType, FinalSigmasType, NoiseLevels, Scheduler, SchedulerConfig, SchedulerKind,
    StepOutput,
};
use crate::{Error, Result};

/// The DEIS multistep scheduler, set to a number of inference steps. Steps must be taken in
/// order (0, 1, ...); step 0 starts a new run.
///
/// ```
/// use ddim::scheduler::{DEISMultistepScheduler, Scheduler, SchedulerKind};
/// let s = DEISMultistepScheduler::new(&SchedulerKind::DeisMultistep.defaults(), 5)?;
/// assert_eq!(s.model_timesteps(), vec![999.0, 799.0, 599.0, 400.0, 200.0]);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DEISMultistepScheduler {
    config: SchedulerConfig,
    timesteps: Vec<usize>,
    /// σ of every step and the one after the last, float32 values as diffusers keeps them.
    sigmas: Vec<f32>,
    /// The noise predictions of the last steps, oldest first (at most `solver_order`).
    history: Vec<Tensor>,
    /// How many steps have run, capped at the order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
    /// The index the next `step` must have.
    next_index: usize,
}

impl DEISMultistepScheduler {
    /// Builds the scheduler from a config and sets `num_inference_steps` (diffusers' `__init__`
    /// and `set_timesteps`). Options diffusers refuses are refused here, naming the key.
    ///
    /// `solver_order` must be 1, 2 or 3 (diffusers runs order 3 for any higher value, which is
    /// refused here rather than silently lowered). DEIS has no `rescale_betas_zero_snr`,
    /// `sigma_min`, `sigma_max` or `final_sigmas_type`; a config that sets them (possible
    /// only for one that names no class) has them ignored, as diffusers' `from_config` does.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check_implemented(SchedulerKind::DeisMultistep)?;
        if !(1..=3).contains(&config.solver_order) {
            return Err(Error::config(
                "solver_order",
                config.solver_order,
                "must be 1, 2 or 3 (DEIS has updates of orders 1 to 3)",
            ));
        }
        if matches!(
            config.algorithm_type,
            AlgorithmType::SdeDpmSolver | AlgorithmType::SdeDpmSolverPlusPlus
        ) {
            return Err(Error::config(
                "algorithm_type",
                format!("\"{}\"", config.algorithm_type),
                "DEISMultistepScheduler takes deis (or dpmsolver / dpmsolver++, which it runs \
                 as deis)",
            ));
        }
        let config = SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..config.clone()
        };
        let levels = NoiseLevels::new(&config)?;
        let (timesteps, sigmas) = multistep_schedule(
            &config,
            "DEISMultistepScheduler",
            &levels.alphas_cumprod,
            num_inference_steps,
            (None, None),
            FinalSigmasType::SigmaMin,
        )?;
        Ok(DEISMultistepScheduler {
            config,
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

    /// The timesteps visited, in order.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// ε̂ from the model output (through x̂0, thresholded if asked), and x̂0.
    fn convert(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        index: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (alpha, sigma) = alpha_sigma_f32(self.sigmas[index]);
        let clip = if self.config.thresholding {
            Clip::Dynamic {
                ratio: self.config.dynamic_thresholding_ratio as f32,
                max: self.config.sample_max_value as f32,
            }
        } else {
            Clip::None
        };
        // ε̂ = (x - α x̂0) / σ, from the (thresholded) x̂0 whatever the prediction type.
        let k = StepCoefficients {
            prediction: self.config.prediction_type,
            sqrt_alpha_prod: alpha,
            sqrt_beta_prod: sigma,
            clip,
            use_clipped_model_output: true,
            c_x0: 0.0,
            c_eps: 1.0,
            c_x: 0.0,
            noise_std: 0.0,
        };
        kernel::fused_step(&k, model_output, sample, None)
    }

    /// The order of step `index`, as diffusers lowers it: at the start, and at the last two
    /// steps of runs shorter than 15 steps with `lower_order_final`.
    fn order_at(&self, index: usize) -> usize {
        let n = self.timesteps.len();
        let lower = self.config.lower_order_final && n < 15;
        if self.config.solver_order == 1 || self.lower_order_nums < 1 || (lower && index + 1 == n) {
            1
        } else if self.config.solver_order == 2
            || self.lower_order_nums < 2
            || (lower && index + 2 == n)
        {
            2
        } else {
            3
        }
    }

    /// The update of the given order from `sample` at step `index`.
    fn update(&self, order: usize, index: usize, sample: &Tensor) -> Result<Tensor> {
        let sigma = |i: usize| self.sigmas[i] as f64;
        let (alpha_t, sigma_t) = alpha_sigma(sigma(index + 1));
        let (alpha_s0, _) = alpha_sigma(sigma(index));
        let newest = self.history.len() - 1;
        let m = |k: usize| &self.history[newest - k];
        if order == 1 {
            let h = sigmas::lambda(sigma(index + 1)) - sigmas::lambda(sigma(index));
            return combine(&[(alpha_t / alpha_s0, sample), (-sigma_t * h.exp_m1(), m(0))]);
        }
        // u = log ρ with ρ = σ (the variance-exploding sigma σ_t / α_t is the stored σ).
        let u = |i: usize| sigma(i).ln();
        let ut = u(index + 1);
        let nodes: Vec<f64> = (0..order).map(|k| u(index - k)).collect();
        let mut terms = vec![(alpha_t / alpha_s0, sample)];
        for k in 0..order {
            let others: Vec<f64> = (0..order).filter(|&j| j != k).map(|j| nodes[j]).collect();
            let w = lagrange_exp_integral(nodes[k], &others, nodes[0], ut);
            terms.push((alpha_t * w, m(k)));
        }
        combine(&terms)
    }
}

/// ∫_{u0}^{u1} e^u L(u) du for the Lagrange basis polynomial L of degree 1 or 2 that is 1 at
/// `node` and 0 at `others`: the antiderivative of e^u P(u) is e^u (P - P' + P''), evaluated at
/// both ends.
fn lagrange_exp_integral(node: f64, others: &[f64], u0: f64, u1: f64) -> f64 {
    let anti = |u: f64| -> f64 {
        match others {
            [c] => u.exp() * (u - c - 1.0) / (node - c),
            [c, d] => {
                let p = (u - c) * (u - d) - (2.0 * u - c - d) + 2.0;
                u.exp() * p / ((node - c) * (node - d))
            }
            _ => f64::NAN,
        }
    };
    anti(u1) - anti(u0)
}

impl Scheduler for DEISMultistepScheduler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.timesteps.iter().map(|&t| t as f64).collect()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
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
        check_index(index, self.next_index, self.timesteps.len())?;
        if index == 0 {
            self.history.clear();
            self.lower_order_nums = 0;
        }
        super::same_shape("model_output", model_output, sample)?;
        if let Some(last) = self.history.last() {
            super::same_shape("sample", sample, last)?;
        }
        let dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?.contiguous()?;
        let (eps, x0) = self.convert(&model_output, &sample, index)?;
        self.history.push(eps);
        if self.history.len() > self.config.solver_order {
            self.history.remove(0);
        }
        let order = self.order_at(index);
        let prev = self.update(order, index, &sample)?;
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_index = index + 1;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: x0.to_dtype(dtype)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn defaults() -> SchedulerConfig {
        SchedulerKind::DeisMultistep.defaults()
    }

    #[test]
    fn refuses_what_diffusers_cannot_run_and_runs_in_order() {
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
                    solver_order: 0,
                    ..defaults()
                },
                "solver_order",
            ),
            (
                SchedulerConfig {
                    algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
                    ..defaults()
                },
                "algorithm_type",
            ),
            (
                SchedulerConfig {
                    timestep_spacing: super::super::TimestepSpacing::Quad,
                    ..defaults()
                },
                "timestep_spacing",
            ),
        ] {
            let e = DEISMultistepScheduler::new(&config, 10).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
        let mut s = DEISMultistepScheduler::new(&defaults(), 3).unwrap();
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = s.step(&x, 2, &x, None).unwrap_err();
        assert!(e.to_string().contains("`index` = 2"), "{e}");
        s.step(&x, 0, &x, None).unwrap();
        assert!(s.step(&x, 2, &x, None).is_err());
        s.step(&x, 1, &x, None).unwrap();
        s.step(&x, 2, &x, None).unwrap();
        assert!(s.step(&x, 3, &x, None).is_err());
    }

    /// The closed-form weights against a numerical integral of e^u L(u).
    #[test]
    fn lagrange_weights_integrate_the_basis() {
        let (u0, u1) = (1.3_f64, 0.4_f64);
        for (node, others) in [(1.3, vec![2.0]), (2.0, vec![1.3]), (1.3, vec![2.0, 2.6])] {
            let l = |u: f64| -> f64 {
                others
                    .iter()
                    .map(|&c: &f64| (u - c) / (node - c))
                    .product::<f64>()
            };
            let n = 20_000;
            let dx = (u1 - u0) / n as f64;
            let numeric: f64 = (0..n)
                .map(|i| {
                    let u = u0 + (i as f64 + 0.5) * dx;
                    u.exp() * l(u) * dx
                })
                .sum();
            let closed = lagrange_exp_integral(node, &others, u0, u1);
            assert!((numeric - closed).abs() < 1e-8, "{numeric} {closed}");
        }
        // The weights of a step sum to ρ_t - ρ_s0 (a constant ε̂ is integrated exactly).
        let nodes = [1.3_f64, 2.0, 2.6];
        let sum: f64 = (0..3)
            .map(|k| {
                let others: Vec<f64> = (0..3).filter(|&j| j != k).map(|j| nodes[j]).collect();
                lagrange_exp_integral(nodes[k], &others, nodes[0], 0.4)
            })
            .sum();
        assert!((sum - (0.4f64.exp() - 1.3f64.exp())).abs() < 1e-12);
    }
}
