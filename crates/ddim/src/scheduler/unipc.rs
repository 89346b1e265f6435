//! UniPC, the unified predictor-corrector sampler (Zhao et al. 2023, arXiv:2302.04867), at parity
//! with diffusers 0.42.1's `UniPCMultistepScheduler`: any order ≥ 1 (1 to 3 are the usual ones),
//! B(h) = h (`bh1`) or e^h - 1 (`bh2`; diffusers runs `midpoint`, `heun` and `logrho` as `bh2`),
//! data or noise prediction (`predict_x0`), the corrector UniC with `disable_corrector`,
//! `lower_order_final`, Karras sigmas with `sigma_min` / `sigma_max`, `final_sigmas_type`, the
//! `linspace` / `leading` / `trailing` spacings, every prediction type, dynamic thresholding and
//! zero-terminal-SNR betas.
//!
//! With λ = log α_t - log σ_t, h = λ_t - λ_s0 and, for data prediction, ĥ = -h (noise
//! prediction: ĥ = h), the predictor UniP-p of a step from s0 to t is, in the paper's B(h)
//! form,
//!
//! ```text
//! x_t = (σ_t / σ_s0) x_s0 - α_t (e^ĥ - 1) m0 - α_t B(ĥ) Σ_k ρ_k D_k        (data prediction)
//! x_t = (α_t / α_s0) x_s0 - σ_t (e^ĥ - 1) m0 - σ_t B(ĥ) Σ_k ρ_k D_k        (noise prediction)
//! ```
//!
//! where m0 is the converted model output at s0, D_k = (m_k - m0) / r_k are the divided
//! differences of the older outputs with r_k = (λ_sk - λ_s0) / h, and ρ solves the Vandermonde
//! system Σ_k r_k^(i-1) ρ_k = i! φ_(i+1)(ĥ) ĥ / B(ĥ) (diffusers fixes ρ = 1/2 at order 2). The
//! corrector UniC-p re-takes the previous step with the model output at its end, m_t, as one more
//! difference (r = 1); its weights solve the full system (ρ = 1/2 at order 1). It runs at the
//! start of every step but the first, before the predictor, so it costs no model evaluation.
//!
//! The scalar coefficients are computed in float64 from diffusers' float32 sigmas (diffusers
//! works in float32, where the φ recursion loses digits for small h); the tensors stay float32.
//!
//! Where diffusers 0.42.1 returns NaN, this module takes the limit of the same formula instead
//! (tools/fixtures/sampler_fixtures_unipc.py generates those fixtures from a reference that
//! patches only the broken step and checks it against diffusers on every step before it):
//!
//! - A step to σ = 0 (`final_sigmas_type = "zero"`, the default) has α_t = 1, λ_t = +∞, h = +∞.
//!   With `bh1`, diffusers multiplies B(ĥ) = -∞ by the zero correction of the first-order last
//!   step, which is NaN for any input (the last step of every `bh1` run with a final σ of 0, e.g.
//!   at 1, 8, 10 and 20 steps). The term is zero for every finite h, so here it is left out and
//!   the step returns m0 = x̂0, as `bh2` does.
//! - With `predict_x0 = false`, the step to σ = 0 computes σ_t (e^h - 1) = 0 · ∞ (NaN in
//!   diffusers). It equals α_t σ_s0 / α_s0 - σ_t exactly, σ_s0 / α_s0 at σ_t = 0: the step
//!   returns (x - σ_s0 ε̂) / α_s0, the x̂0 of the noise prediction.
//! - A step of order ≥ 2 to σ = 0 (`lower_order_final = false`) has r_k = 0 and infinite D_k
//!   (diffusers: NaN at order 2, a singular solve at order 3); extrapolating a polynomial in λ to
//!   λ = ∞ has no finite value. That step is taken at order 1 here, as diffusers' DPM-Solver does
//!   before a final σ of 0.
//! - With Karras sigmas and `final_sigmas_type = "sigma_min"` the last step goes from σ_min to
//!   σ_min (h = 0), where diffusers' third-order step is 0/0. A step of length 0 is the identity.
//!
//! Other differences: `trailing` spacing gives exactly N steps (numpy's `arange` over float steps
//! gives N + 1 for some N, e.g. 61 of 1000, the last at timestep -1), and schedules that would
//! repeat a noise level (more steps than the spacing has distinct timesteps, or a `steps_offset`
//! past the last training timestep) are refused instead of running into NaN.

use candle_core::{DType, Tensor};

use super::kernel::{self, Clip, StepCoefficients};
use super::sigmas::{self, alpha_sigma};
use super::{
    FinalSigmasType, NoiseLevels, Scheduler, SchedulerConfig, SchedulerKind, SolverType,
    StepOutput, TimestepSpacing,
};
use crate::{Error, Result};

/// The UniPC multistep scheduler, set to a number of inference steps. Steps must be taken in
/// order (0, 1, ...); step 0 starts a new run.
///
/// ```
/// use ddim::scheduler::{Scheduler, SchedulerKind, UniPCMultistepScheduler};
/// let s = UniPCMultistepScheduler::new(&SchedulerKind::UniPcMultistep.defaults(), 5)?;
/// assert_eq!(s.model_timesteps(), vec![999.0, 799.0, 599.0, 400.0, 200.0]);
/// assert_eq!(s.sigmas().unwrap().last(), Some(&0.0));
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct UniPCMultistepScheduler {
    config: SchedulerConfig,
    /// B(h) = h; otherwise B(h) = e^h - 1.
    bh1: bool,
    timesteps: Vec<usize>,
    /// σ of every step and the one after the last, float32 values as diffusers keeps them.
    sigmas: Vec<f32>,
    /// The converted model outputs of the last steps, oldest first (at most `solver_order`).
    history: Vec<Tensor>,
    /// The sample the last predictor started from (after its correction), for the corrector.
    last_sample: Option<Tensor>,
    /// The order of the last predictor, which is the order of the next corrector.
    last_order: usize,
    /// How many steps have run, capped at the order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
    /// The index the next `step` must have.
    next_index: usize,
}

impl UniPCMultistepScheduler {
    /// Builds the scheduler from a config and sets `num_inference_steps` (diffusers' `__init__`
    /// and `set_timesteps`). Options diffusers refuses, and schedules it would run into NaN,
    /// are refused here with an error naming the key.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check_implemented(SchedulerKind::UniPcMultistep)?;
        if config.solver_order == 0 {
            return Err(Error::config(
                "solver_order",
                0,
                "must be at least 1 (UniPC runs any order; 1 to 3 are the usual ones)",
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
        let (timesteps, sigmas) = multistep_schedule(
            config,
            "UniPCMultistepScheduler",
            &alphas_cumprod,
            num_inference_steps,
            (config.sigma_min, config.sigma_max),
            config.final_sigmas_type,
        )?;
        Ok(UniPCMultistepScheduler {
            config: config.clone(),
            bh1: config.solver_type == SolverType::Bh1,
            timesteps,
            sigmas,
            history: Vec::new(),
            last_sample: None,
            last_order: 1,
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

    /// The solver type in use: `bh1`, or `bh2` (which diffusers runs for every other name).
    pub fn solver_type(&self) -> SolverType {
        if self.bh1 {
            SolverType::Bh1
        } else {
            SolverType::Bh2
        }
    }

    fn sigma(&self, i: usize) -> f64 {
        self.sigmas[i] as f64
    }

    fn lambda(&self, i: usize) -> f64 {
        sigmas::lambda(self.sigma(i))
    }

    /// The model output as UniPC integrates it (x̂0, thresholded if asked, or ε̂), and x̂0.
    fn convert(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        index: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (alpha, sigma) = alpha_sigma_f32(self.sigmas[index]);
        let x0_mode = self.config.predict_x0;
        let clip = if x0_mode && self.config.thresholding {
            Clip::Dynamic {
                ratio: self.config.dynamic_thresholding_ratio as f32,
                max: self.config.sample_max_value as f32,
            }
        } else {
            Clip::None
        };
        let k = StepCoefficients {
            prediction: self.config.prediction_type,
            sqrt_alpha_prod: alpha,
            sqrt_beta_prod: sigma,
            clip,
            use_clipped_model_output: false,
            c_x0: if x0_mode { 1.0 } else { 0.0 },
            c_eps: if x0_mode { 0.0 } else { 1.0 },
            c_x: 0.0,
            noise_std: 0.0,
        };
        let (converted, x0) = kernel::fused_step(&k, model_output, sample, None)?;
        Ok(if x0_mode {
            (x0.clone(), x0)
        } else {
            (converted, x0)
        })
    }

    /// The order of the predictor at step `index`: lowered at the start (not enough history),
    /// at the last steps with `lower_order_final`, and to 1 on a step to σ = 0.
    fn order_at(&self, index: usize) -> usize {
        let n = self.timesteps.len();
        let mut order = self.config.solver_order;
        if self.config.lower_order_final {
            order = order.min(n - index);
        }
        order = order.min(self.lower_order_nums + 1);
        if self.sigmas[index + 1] == 0.0 {
            order = 1;
        }
        order
    }

    /// (coefficient of the start sample, of m0, the factor A B(ĥ) of the corrections, ĥ, B(ĥ))
    /// of a step from σ index `s0` to `t`.
    fn base(&self, s0: usize, t: usize) -> Base {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(t));
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigma(s0));
        let h = self.lambda(t) - self.lambda(s0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        let (c_x, c_m0, a) = if self.config.predict_x0 {
            (sigma_t / sigma_s0, -alpha_t * hh.exp_m1(), alpha_t)
        } else {
            // σ_t (e^h - 1) = α_t σ_s0 / α_s0 - σ_t, which stays finite at σ_t = 0.
            let c = if sigma_t == 0.0 {
                alpha_t * sigma_s0 / alpha_s0
            } else {
                sigma_t * h.exp_m1()
            };
            (alpha_t / alpha_s0, -c, sigma_t)
        };
        Base {
            c_x,
            c_m0,
            a_bh: a * b_h,
            hh,
            b_h,
        }
    }

    /// UniP-`order` from `sample` at step `index`; the history holds m0 (newest) and the older
    /// outputs.
    fn predict(&self, order: usize, index: usize, sample: &Tensor) -> Result<Tensor> {
        if self.sigmas[index + 1] == self.sigmas[index] {
            // h = 0: a step of length 0.
            return Ok(sample.clone());
        }
        let base = self.base(index, index + 1);
        let newest = self.history.len() - 1;
        let mut terms = vec![(base.c_x, sample), (base.c_m0, &self.history[newest])];
        if order >= 2 {
            let h = self.lambda(index + 1) - self.lambda(index);
            let l0 = self.lambda(index);
            let r: Vec<f64> = (1..order)
                .map(|k| (self.lambda(index - k) - l0) / h)
                .collect();
            let rho = if order == 2 {
                vec![0.5]
            } else {
                let b = b_vector(base.hh, base.b_h, order - 1);
                solve_vandermonde(&r, &b).ok_or_else(|| singular(index))?
            };
            for (k, (&rk, &rho_k)) in r.iter().zip(&rho).enumerate() {
                let c = base.a_bh * rho_k / rk;
                terms[1].0 += c;
                terms.push((-c, &self.history[newest - 1 - k]));
            }
        }
        combine(&terms)
    }

    /// UniC: re-takes the step from `last_sample` (σ index `index - 1`) to `index` with the model
    /// output there, `model_t`, at the order of that step's predictor. The history still ends
    /// with the output at `index - 1`.
    fn correct(
        &self,
        index: usize,
        last_sample: &Tensor,
        this_sample: &Tensor,
        model_t: &Tensor,
    ) -> Result<Tensor> {
        let s0 = index - 1;
        if self.sigmas[index] == self.sigmas[s0] {
            return Ok(this_sample.clone());
        }
        let order = self.last_order;
        let base = self.base(s0, index);
        let newest = self.history.len() - 1;
        let h = self.lambda(index) - self.lambda(s0);
        let l0 = self.lambda(s0);
        let mut r: Vec<f64> = (1..order).map(|k| (self.lambda(s0 - k) - l0) / h).collect();
        let rho = if order == 1 {
            vec![0.5]
        } else {
            r.push(1.0);
            let b = b_vector(base.hh, base.b_h, order);
            let rho = solve_vandermonde(&r, &b).ok_or_else(|| singular(index))?;
            r.pop();
            rho
        };
        let rho_t = rho[order - 1];
        let mut terms = vec![
            (base.c_x, last_sample),
            (base.c_m0 + base.a_bh * rho_t, &self.history[newest]),
            (-base.a_bh * rho_t, model_t),
        ];
        for (k, (&rk, &rho_k)) in r.iter().zip(&rho).enumerate() {
            let c = base.a_bh * rho_k / rk;
            terms[1].0 += c;
            terms.push((-c, &self.history[newest - 1 - k]));
        }
        combine(&terms)
    }
}

/// The scalars of one UniPC step; see [`UniPCMultistepScheduler::base`].
struct Base {
    c_x: f64,
    c_m0: f64,
    a_bh: f64,
    hh: f64,
    b_h: f64,
}

impl Scheduler for UniPCMultistepScheduler {
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
            self.last_sample = None;
            self.lower_order_nums = 0;
        }
        super::same_shape("model_output", model_output, sample)?;
        if let Some(last) = &self.last_sample {
            super::same_shape("sample", sample, last)?;
        }
        let dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?.contiguous()?;
        let (converted, x0) = self.convert(&model_output, &sample, index)?;
        let sample = match &self.last_sample {
            Some(last) if index > 0 && !self.config.disable_corrector.contains(&(index - 1)) => {
                self.correct(index, last, &sample, &converted)?
            }
            _ => sample,
        };
        self.history.push(converted);
        if self.history.len() > self.config.solver_order {
            self.history.remove(0);
        }
        let order = self.order_at(index);
        let prev = self.predict(order, index, &sample)?;
        self.last_sample = Some(sample);
        self.last_order = order;
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

/// (α_t, σ_t) of the variance-preserving process at σ, in float32 as diffusers computes them
/// for the model-output conversion: α = 1 / sqrt(σ² + 1), σ_t = σ α.
pub(super) fn alpha_sigma_f32(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// A multistep solver's steps run in order; step 0 may always start a new run.
pub(super) fn check_index(index: usize, next: usize, steps: usize) -> Result<()> {
    if index >= steps || (index != next && index != 0) {
        return Err(Error::argument(
            "index",
            index,
            format!(
                "a multistep solver runs its {steps} steps in order: the next one is {next} \
                 (or 0 to start again)"
            ),
        ));
    }
    Ok(())
}

/// Σ c_i t_i over tensors of one shape (terms with c_i = 0 are left out).
pub(super) fn combine(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut out: Option<Tensor> = None;
    for &(c, t) in terms {
        if c == 0.0 {
            continue;
        }
        let term = if c == 1.0 {
            t.clone()
        } else {
            t.affine(c, 0.0)?
        };
        out = Some(match out {
            None => term,
            Some(acc) => (acc + term)?,
        });
    }
    match (out, terms.first()) {
        (Some(t), _) => Ok(t),
        (None, Some((_, t))) => Ok(t.zeros_like()?),
        (None, None) => Err(Error::argument(
            "terms",
            "[]",
            "a linear combination needs at least one tensor",
        )),
    }
}

/// b_i = i! · g_i(ĥ) / B(ĥ) for i = 1..=n (see [`g_values`]).
fn b_vector(hh: f64, b_h: f64, n: usize) -> Vec<f64> {
    let mut factorial = 1.0;
    g_values(hh, n)
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            factorial *= (i + 1) as f64;
            factorial * g / b_h
        })
        .collect()
}

/// g_1..g_n at ĥ, where g_1 = (e^ĥ - 1)/ĥ - 1 and g_(i+1) = g_i / ĥ - 1/(i+1)!: ĥ^i g_i is what
/// is left of e^ĥ after its Taylor terms up to ĥ^i. For |ĥ| < 1 that recursion loses digits, so
/// g_i is summed as its series Σ_{j≥1} ĥ^j / (j+i)! there.
fn g_values(hh: f64, n: usize) -> Vec<f64> {
    if hh.abs() < 1.0 {
        g_series(hh, n)
    } else {
        g_recursion(hh, n)
    }
}

fn g_series(hh: f64, n: usize) -> Vec<f64> {
    let mut factorial = 1.0; // i!
    (1..=n)
        .map(|i| {
            factorial *= i as f64;
            // ĥ / (i+1)!, then each term times ĥ / (j+i+1).
            let mut term = hh / (factorial * (i as f64 + 1.0));
            let mut g = 0.0;
            let mut j = 1.0;
            while j < 60.0 && term != 0.0 {
                g += term;
                term *= hh / (j + i as f64 + 1.0);
                j += 1.0;
            }
            g
        })
        .collect()
}

fn g_recursion(hh: f64, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut g = hh.exp_m1() / hh - 1.0;
    let mut factorial = 1.0;
    for i in 1..=n {
        factorial *= i as f64;
        out.push(g);
        g = g / hh - 1.0 / (factorial * (i as f64 + 1.0));
    }
    out
}

/// The weights ρ of Σ_k r_k^i ρ_k = b_i (i = 0..n): the Vandermonde system of UniPC, solved by
/// Gaussian elimination with partial pivoting in float64. `None` when it is singular.
fn solve_vandermonde(r: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    let n = b.len();
    if r.len() < n {
        return None;
    }
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).map(|k| r[k].powi(i as i32)).collect();
            row.push(b[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col] == 0.0 || !a[pivot][col].is_finite() {
            return None;
        }
        a.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for row in lower.iter_mut() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| a[i][k] * x[k]).sum();
        x[i] = (a[i][n] - s) / a[i][i];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

fn singular(index: usize) -> Error {
    Error::argument(
        "index",
        index,
        "the noise levels of this step and the ones before it give a singular system \
         (repeated noise levels)",
    )
}

/// UniPC's and DEIS's `set_timesteps`: the model timesteps and the N + 1 sigmas (float32), for
/// `class` (named in errors). Karras sigmas run from `karras_range` (σ_min, σ_max; the training
/// schedule's ends where `None`); the last sigma is 0 or, with `SigmaMin`, the smallest (the
/// Karras schedule's last, otherwise the training σ at t = 0).
pub(super) fn multistep_schedule(
    config: &SchedulerConfig,
    class: &str,
    alphas_cumprod: &[f32],
    n: usize,
    karras_range: (Option<f64>, Option<f64>),
    final_sigma: FinalSigmasType,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t_train = alphas_cumprod.len();
    let bad_steps = |most: usize, why: &str| {
        Error::argument(
            "num_inference_steps",
            n,
            format!("must be between 1 and {most} ({why}, with num_train_timesteps = {t_train})"),
        )
    };
    if n == 0 {
        return Err(bad_steps(
            t_train.saturating_sub(1).max(1),
            "the default spacing",
        ));
    }
    let train_sigmas = sigmas::training_sigmas(alphas_cumprod);
    let (timesteps, mut step_sigmas): (Vec<usize>, Vec<f64>) = if config.use_karras_sigmas {
        let log_sigmas = sigmas::log_sigmas(&train_sigmas);
        let min = karras_range.0.unwrap_or(train_sigmas[0] as f64);
        let max = karras_range.1.unwrap_or(train_sigmas[t_train - 1] as f64);
        if !(min.is_finite() && min > 0.0) {
            return Err(Error::config("sigma_min", min, "must be a positive number"));
        }
        if !(max.is_finite() && max > min) {
            return Err(Error::config(
                "sigma_max",
                max,
                format!("must be a finite number above sigma_min = {min}"),
            ));
        }
        let s = sigmas::karras(min, max, n);
        let t = s
            .iter()
            .map(|&s| sigmas::sigma_to_t(s, &log_sigmas).round_ties_even() as usize)
            .collect();
        (t, s)
    } else {
        let timesteps = spaced(config, class, t_train, n, &bad_steps)?;
        let s = timesteps.iter().map(|&t| train_sigmas[t] as f64).collect();
        (timesteps, s)
    };
    let last = match final_sigma {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin if config.use_karras_sigmas => step_sigmas[n - 1],
        FinalSigmasType::SigmaMin => train_sigmas[0] as f64,
    };
    step_sigmas.push(last);
    let sigmas: Vec<f32> = step_sigmas.into_iter().map(|s| s as f32).collect();
    // Every step but the last must lower the noise level (a repeated σ makes r_k = 0 or ∞).
    if let Some(i) = (1..n).find(|&i| sigmas[i] >= sigmas[i - 1] || sigmas[i].is_nan()) {
        return Err(Error::argument(
            "num_inference_steps",
            n,
            format!(
                "gives the noise level σ = {} twice (steps {} and {i}); use fewer steps",
                sigmas[i],
                i - 1
            ),
        ));
    }
    Ok((timesteps, sigmas))
}

/// The timesteps of the spacing (descending), as UniPC's and DEIS's `set_timesteps` lay them:
/// `linspace` and `leading` divide the range into N + 1 parts and drop the one at 0.
fn spaced(
    config: &SchedulerConfig,
    class: &str,
    t_train: usize,
    n: usize,
    bad_steps: &dyn Fn(usize, &str) -> Error,
) -> Result<Vec<usize>> {
    match config.timestep_spacing {
        TimestepSpacing::Linspace => {
            if n >= t_train {
                return Err(bad_steps(t_train - 1, "linspace spacing"));
            }
            let mut v: Vec<usize> = sigmas::linspace(0.0, (t_train - 1) as f64, n + 1)
                .into_iter()
                .skip(1)
                .map(|t| t.round_ties_even() as usize)
                .collect();
            v.reverse();
            Ok(v)
        }
        TimestepSpacing::Leading => {
            let ratio = t_train / (n + 1);
            if ratio == 0 {
                return Err(bad_steps(t_train - 1, "leading spacing"));
            }
            let offset = config.steps_offset;
            if n * ratio + offset >= t_train {
                return Err(Error::config(
                    "steps_offset",
                    offset,
                    format!(
                        "with {n} leading steps it gives timestep {}, past the last training \
                         timestep {}; lower steps_offset or the number of steps",
                        n * ratio + offset,
                        t_train - 1
                    ),
                ));
            }
            Ok((1..=n).rev().map(|i| i * ratio + offset).collect())
        }
        TimestepSpacing::Trailing => {
            if n > t_train {
                return Err(bad_steps(t_train, "trailing spacing"));
            }
            super::spaced_timesteps(TimestepSpacing::Trailing, t_train, n, 0)
        }
        TimestepSpacing::Quad => Err(Error::config(
            "timestep_spacing",
            "\"quad\"",
            format!("{class} takes linspace, leading or trailing (quad is DDIM's)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn defaults() -> SchedulerConfig {
        SchedulerKind::UniPcMultistep.defaults()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn refuses_bad_options_naming_the_key() {
        for (config, steps, key) in [
            (
                SchedulerConfig {
                    solver_order: 0,
                    ..defaults()
                },
                10,
                "solver_order",
            ),
            (
                SchedulerConfig {
                    timestep_spacing: TimestepSpacing::Quad,
                    ..defaults()
                },
                10,
                "timestep_spacing",
            ),
            (
                SchedulerConfig {
                    timestep_spacing: TimestepSpacing::Leading,
                    steps_offset: 200,
                    ..defaults()
                },
                10,
                "steps_offset",
            ),
            (
                SchedulerConfig {
                    use_karras_sigmas: true,
                    sigma_min: Some(5.0),
                    sigma_max: Some(1.0),
                    ..defaults()
                },
                10,
                "sigma_max",
            ),
            (
                SchedulerConfig {
                    use_karras_sigmas: true,
                    sigma_min: Some(-1.0),
                    ..defaults()
                },
                10,
                "sigma_min",
            ),
            (
                SchedulerConfig {
                    use_exponential_sigmas: true,
                    ..defaults()
                },
                10,
                "use_exponential_sigmas",
            ),
            (defaults(), 0, "num_inference_steps"),
            (defaults(), 1000, "num_inference_steps"),
            (
                SchedulerConfig {
                    timestep_spacing: TimestepSpacing::Leading,
                    ..defaults()
                },
                1000,
                "num_inference_steps",
            ),
        ] {
            let e = UniPCMultistepScheduler::new(&config, steps).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
        // Trailing takes every training timestep, and N steps exactly (numpy gives 62 for 61).
        let trailing = SchedulerConfig {
            timestep_spacing: TimestepSpacing::Trailing,
            ..defaults()
        };
        assert!(UniPCMultistepScheduler::new(&trailing, 1000).is_ok());
        let s = UniPCMultistepScheduler::new(&trailing, 61).unwrap();
        assert_eq!(s.timesteps().len(), 61);
        assert_eq!(s.timesteps().last(), Some(&15));
    }

    #[test]
    fn steps_run_in_order_and_step_0_starts_again() {
        let mut s = UniPCMultistepScheduler::new(&defaults(), 4).unwrap();
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = s.step(&x, 1, &x, None).unwrap_err();
        assert!(e.to_string().contains("`index` = 1"), "{e}");
        s.step(&x, 0, &x, None).unwrap();
        s.step(&x, 1, &x, None).unwrap();
        assert!(s.step(&x, 3, &x, None).is_err());
        assert!(s.step(&x, 1, &x, None).is_err());
        let a = s.step(&x, 0, &x, None).unwrap().prev_sample;
        let mut fresh = UniPCMultistepScheduler::new(&defaults(), 4).unwrap();
        let b = fresh.step(&x, 0, &x, None).unwrap().prev_sample;
        assert_eq!(max_abs(&(a - b).unwrap()), 0.0);
        assert!(s.step(&x, 4, &x, None).is_err());
        // A model output of another shape is an error, not a panic.
        let y = Tensor::ones((1, 1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = s.step(&y, 1, &x, None).unwrap_err();
        assert!(e.to_string().contains("model_output"), "{e}");
    }

    /// Every combination diffusers turns into NaN at the last step ends finite here, on x̂0.
    #[test]
    fn the_step_to_sigma_zero_is_finite_and_lands_on_x0() {
        let x = Tensor::new(&[[[[0.5f32, -1.0]]]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[[[0.1f32, 0.2]]]], &Device::Cpu).unwrap();
        for (solver_type, predict_x0, lower_order_final, order) in [
            (SolverType::Bh1, true, true, 2),
            (SolverType::Bh2, false, true, 2),
            (SolverType::Bh1, false, true, 3),
            (SolverType::Bh2, true, false, 2),
            (SolverType::Bh1, true, false, 3),
        ] {
            let config = SchedulerConfig {
                solver_type,
                predict_x0,
                lower_order_final,
                solver_order: order,
                ..defaults()
            };
            for steps in [1, 3] {
                let mut s = UniPCMultistepScheduler::new(&config, steps).unwrap();
                let mut sample = x.clone();
                let mut last = None;
                for i in 0..steps {
                    last = Some(s.step(&eps, i, &sample, None).unwrap());
                    sample = last.as_ref().unwrap().prev_sample.clone();
                }
                let out = last.unwrap();
                let scale = max_abs(&out.pred_original_sample).max(1.0);
                let d = max_abs(&(out.prev_sample - out.pred_original_sample).unwrap());
                assert!(d < 1e-6 * scale, "{config:?} {steps}: {d}");
            }
        }
    }

    #[test]
    fn b_vector_series_and_recursion_agree() {
        // Where both are accurate (|ĥ| near 1) they agree to float64 rounding.
        for hh in [-1.5, -0.9, -0.5, 0.5, 0.9, 1.5] {
            let (a, b) = (g_series(hh, 3), g_recursion(hh, 3));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-13 * (1.0 + x.abs()), "{hh}: {a:?} {b:?}");
            }
        }
        // For small ĥ the series keeps g_3 = ĥ/4! + ĥ²/5! + ... to full precision.
        let g = g_values(-1e-6, 3);
        let h: f64 = -1e-6;
        assert!((g[2] - (h / 24.0 + h * h / 120.0)).abs() < 1e-20, "{g:?}");
        // g_1 = (e^h - 1)/h - 1, g_2 = g_1 / h - 1/2.
        let h: f64 = -2.0;
        let g1 = h.exp_m1() / h - 1.0;
        let b = b_vector(h, 1.0, 2);
        assert!((b[0] - g1).abs() < 1e-15 && (b[1] - 2.0 * (g1 / h - 0.5)).abs() < 1e-15);
        assert_eq!(solve_vandermonde(&[0.5, 0.5], &[1.0, 2.0]), None);
        let rho = solve_vandermonde(&[-1.0, 1.0], &[1.0, 0.0]).unwrap();
        assert!((rho[0] - 0.5).abs() < 1e-15 && (rho[1] - 0.5).abs() < 1e-15);
    }
}
