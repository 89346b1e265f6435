//! Pseudo numerical methods for diffusion models (Liu, Ren, Lin, Zhao 2022, "Pseudo Numerical
//! Methods for Diffusion Models on Manifolds", arXiv:2202.09778), following diffusers'
//! `PNDMScheduler`: the transfer φ(x_t, ε, t → t') of DDIM (eq. 11 of the paper) driven by
//! combined noise estimates, either four pseudo Runge–Kutta steps (PRK, eq. 13) followed by
//! pseudo linear multistep steps (PLMS, eq. 12), or PLMS only (`skip_prk_steps`, started with a
//! second-order pseudo improved Euler step as in diffusers).
//!
//! The timestep list is diffusers' exactly, with its repetitions: in PRK mode the last four
//! inference timesteps of the spacing are visited as `[d, c+h, c+h, c, c, b+h, b+h, b, b, a+h,
//! a+h, a]` (h = T // N // 2) and PLMS carries on from `a` again, N + 9 model evaluations in all;
//! with `skip_prk_steps` the second timestep is visited twice (N + 1 evaluations). Where the
//! midpoints h do not halve the gaps (`linspace`, or an odd T // N) the steps land where
//! diffusers' arithmetic puts them, not on the listed timesteps.
//!
//! diffusers' step returns no x̂0; here `pred_original_sample` is the x̂0 of the combined noise
//! estimate at the timestep the transfer starts from.

use candle_core::Tensor;

use super::euler::{div_scalar, step_inputs};
use super::{
    spaced_timesteps, timestep_at, NoiseLevels, PredictionType, Scheduler, SchedulerConfig,
    StepOutput, TimestepSpacing,
};
use crate::{Error, Result};

/// The number of PRK stages' worth of history PLMS needs (diffusers' `pndm_order`).
const PNDM_ORDER: usize = 4;

/// The PNDM scheduler (deterministic).
///
/// ```
/// use ddim::scheduler::{PNDMScheduler, SchedulerKind};
/// let mut s = PNDMScheduler::new(&SchedulerKind::Pndm.defaults())?;
/// s.set_timesteps(10)?;
/// assert_eq!(&s.timesteps()[..5], &[900, 850, 850, 800, 800]);
/// assert_eq!(s.timesteps().len(), 19);
/// # Ok::<(), ddim::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PNDMScheduler {
    config: SchedulerConfig,
    levels: NoiseLevels,
    /// ᾱ after the last step: 1 (`set_alpha_to_one`) or ᾱ_0.
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    /// The number of PRK evaluations at the start (12, or 0 with `skip_prk_steps`).
    prk_len: usize,
    timesteps: Vec<usize>,
    state: State,
}

/// What PNDM carries between steps (diffusers' `counter`, `ets`, `cur_model_output`,
/// `cur_sample`).
#[derive(Clone, Debug, Default)]
struct State {
    counter: usize,
    /// The noise estimates PLMS combines, the oldest first (at most 4).
    ets: Vec<Tensor>,
    /// The running Runge–Kutta sum of the current PRK step.
    rk_sum: Option<Tensor>,
    /// The sample the current PRK step (or the first PLMS step) started from.
    cur_sample: Option<Tensor>,
}

impl PNDMScheduler {
    /// Builds the scheduler from a config. PNDM takes `epsilon` and `v_prediction` models (as in
    /// diffusers, which raises for `sample`).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::config(
                "prediction_type",
                "\"sample\"",
                "PNDMScheduler supports epsilon and v_prediction",
            ));
        }
        if config.timestep_spacing == TimestepSpacing::Quad {
            return Err(Error::config(
                "timestep_spacing",
                "\"quad\"",
                "PNDMScheduler supports linspace, leading and trailing",
            ));
        }
        // PNDMScheduler has no rescale_betas_zero_snr key (diffusers drops one carried over).
        let own = SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..config.clone()
        };
        let levels = NoiseLevels::new(&own)?;
        let final_alpha_cumprod = if own.set_alpha_to_one {
            1.0
        } else {
            levels.alphas_cumprod[0]
        };
        Ok(PNDMScheduler {
            config: own,
            levels,
            final_alpha_cumprod,
            num_inference_steps: 0,
            prk_len: 0,
            timesteps: Vec::new(),
            state: State::default(),
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

    /// Sets `num_inference_steps` steps and diffusers' timestep list (see the module docs).
    /// PRK mode needs at least 4 steps (diffusers fails on fewer).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        let t_max = self.config.num_train_timesteps;
        // Descending; reversed below to ascending, as diffusers' `_timesteps`.
        let mut base = spaced_timesteps(
            self.config.timestep_spacing,
            t_max,
            n,
            self.config.steps_offset,
        )?;
        if base.len() != n {
            return Err(Error::argument(
                "num_inference_steps",
                n,
                format!("gives repeated {} timesteps", self.config.timestep_spacing),
            ));
        }
        base.reverse();
        let (prk, plms): (Vec<usize>, Vec<usize>) = if self.config.skip_prk_steps {
            // [t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0]
            let mut plms: Vec<usize> = base.iter().rev().copied().collect();
            if n >= 2 {
                plms.insert(1, base[n - 2]);
            }
            (Vec::new(), plms)
        } else {
            if n < PNDM_ORDER {
                return Err(Error::argument(
                    "num_inference_steps",
                    n,
                    "must be at least 4 with PRK steps (skip_prk_steps = false): the first \
                     four steps are Runge-Kutta steps",
                ));
            }
            let h = t_max / n / 2;
            // The last four timesteps, each followed by its midpoint, less the final midpoint,
            // each twice less the first and last entry, reversed.
            let last: Vec<usize> = base[n - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + h])
                .collect();
            let doubled: Vec<usize> = last[..last.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let prk: Vec<usize> = doubled[1..doubled.len() - 1]
                .iter()
                .rev()
                .copied()
                .collect();
            let plms: Vec<usize> = base[..n - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        self.prk_len = prk.len();
        self.timesteps = prk.into_iter().chain(plms).collect();
        self.num_inference_steps = n;
        self.state = State::default();
        Ok(())
    }

    /// The timesteps visited, in order, with diffusers' repetitions.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// ᾱ at `t`, the final ᾱ before timestep 0.
    fn alpha_at(&self, t: i64) -> Result<f32> {
        if t < 0 {
            Ok(self.final_alpha_cumprod)
        } else {
            self.levels.alpha_prod(t as usize)
        }
    }

    /// The DDIM transfer of `sample` from `t` to `prev` with noise estimate `model_output`
    /// (diffusers' `_get_prev_sample`, float32 scalars), and the x̂0 it implies.
    fn transfer(
        &self,
        sample: &Tensor,
        t: i64,
        prev: i64,
        model_output: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev)?;
        if a_t <= 0.0 {
            return Err(Error::argument(
                "timestep",
                t,
                "ᾱ_t = 0 here, where PNDM's transfer divides by ᾱ_t; check the betas",
            ));
        }
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => {
                (model_output.affine(a_t.sqrt() as f64, 0.0)?
                    + sample.affine(b_t.sqrt() as f64, 0.0)?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let scaled = div_scalar(&eps.affine((a_prev - a_t) as f64, 0.0)?, denom)?;
        let prev_sample = (sample.affine(sample_coeff as f64, 0.0)? - scaled)?;
        let x0 = div_scalar(&(sample - eps.affine(b_t.sqrt() as f64, 0.0)?)?, a_t.sqrt())?;
        Ok((prev_sample, x0))
    }

    /// Step `index` (steps run in order from 0; step 0 starts a new run).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let timestep = timestep_at(&self.timesteps, index)?;
        if index == 0 {
            self.state = State::default();
        }
        if index != self.state.counter {
            return Err(Error::argument(
                "index",
                index,
                format!(
                    "PNDM steps run in order: the next step is {} (or 0 to start over)",
                    self.state.counter
                ),
            ));
        }
        let (model_output, sample) = step_inputs(model_output, sample)?;
        let (prev_sample, x0) = if index < self.prk_len {
            self.step_prk(model_output, timestep, sample)?
        } else {
            self.step_plms(model_output, timestep, sample)?
        };
        self.state.counter += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }

    /// Stage `counter % 4` of a pseudo Runge–Kutta step (weights 1/6, 1/3, 1/3, 1/6).
    fn step_prk(
        &mut self,
        model_output: Tensor,
        timestep: usize,
        sample: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let counter = self.state.counter;
        let h = self.config.num_train_timesteps / self.num_inference_steps / 2;
        let diff = if counter % 2 == 1 { 0 } else { h };
        let prev = timestep as i64 - diff as i64;
        let from = self.timesteps[counter / 4 * 4] as i64;
        let combined = match counter % 4 {
            0 => {
                self.state.rk_sum = Some(model_output.affine(1.0 / 6.0, 0.0)?);
                self.state.ets.push(model_output.clone());
                self.state.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let third = model_output.affine(1.0 / 3.0, 0.0)?;
                self.state.rk_sum = Some(match self.state.rk_sum.take() {
                    Some(s) => (s + third)?,
                    None => third,
                });
                model_output
            }
            _ => {
                let sixth = model_output.affine(1.0 / 6.0, 0.0)?;
                match self.state.rk_sum.take() {
                    Some(s) => (s + sixth)?,
                    None => sixth,
                }
            }
        };
        let start = self.state.cur_sample.clone().unwrap_or(sample);
        self.transfer(&start, from, prev, &combined)
    }

    /// A pseudo linear multistep step: Adams–Bashforth weights on the last noise estimates.
    fn step_plms(
        &mut self,
        model_output: Tensor,
        timestep: usize,
        sample: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let counter = self.state.counter;
        let ratio = (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let mut t = timestep as i64;
        let mut prev = t - ratio;
        if counter != 1 {
            let keep = self.state.ets.len().saturating_sub(3);
            self.state.ets.drain(..keep);
            self.state.ets.push(model_output.clone());
        } else {
            // The second step of a PLMS-only run redoes the first from its start with the mean
            // of the two estimates (a pseudo improved Euler step).
            prev = t;
            t += ratio;
        }
        let ets = &self.state.ets;
        let e = |k: usize| &ets[ets.len() - k];
        let mut sample = sample;
        let combined = match ets.len() {
            1 if counter == 0 => {
                self.state.cur_sample = Some(sample.clone());
                model_output
            }
            1 if counter == 1 => {
                let mean = ((model_output + e(1))? / 2.0)?;
                if let Some(s) = self.state.cur_sample.take() {
                    sample = s;
                }
                mean
            }
            2 => ((e(1).affine(3.0, 0.0)? - e(2))? / 2.0)?,
            3 => {
                let s = ((e(1).affine(23.0, 0.0)? - e(2).affine(16.0, 0.0)?)?
                    + e(3).affine(5.0, 0.0)?)?;
                div_scalar(&s, 12.0)?
            }
            4 => {
                let s = (((e(1).affine(55.0, 0.0)? - e(2).affine(59.0, 0.0)?)?
                    + e(3).affine(37.0, 0.0)?)?
                    - e(4).affine(9.0, 0.0)?)?;
                s.affine(1.0 / 24.0, 0.0)?
            }
            _ => {
                return Err(Error::argument(
                    "index",
                    counter,
                    "PNDM's multistep history is out of step; run the steps in order from 0",
                ))
            }
        };
        self.transfer(&sample, t, prev, &combined)
    }
}

impl Scheduler for PNDMScheduler {
    fn model_timesteps(&self) -> Vec<f64> {
        self.timesteps.iter().map(|&t| t as f64).collect()
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
        PNDMScheduler::step(self, model_output, index, sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SchedulerKind;
    use candle_core::{DType, Device};

    fn pndm(skip: bool, n: usize) -> Result<PNDMScheduler> {
        let mut s = PNDMScheduler::new(&SchedulerConfig {
            skip_prk_steps: skip,
            ..SchedulerKind::Pndm.defaults()
        })?;
        s.set_timesteps(n)?;
        Ok(s)
    }

    #[test]
    fn timestep_layouts_are_diffusers() {
        let s = pndm(false, 10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[
                900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600, 600, 500, 400, 300,
                200, 100, 0
            ]
        );
        let s = pndm(true, 10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[900, 800, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
        assert_eq!(pndm(true, 1).unwrap().timesteps(), &[0]);
        assert_eq!(pndm(true, 2).unwrap().timesteps(), &[500, 0, 0]);
    }

    #[test]
    fn refuses_what_diffusers_cannot_run() {
        for n in [0, 1, 2, 3] {
            let e = pndm(false, n)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("num_inference_steps"), "{n}: {e}");
        }
        assert!(pndm(true, 0).is_err());
        let e = PNDMScheduler::new(&SchedulerConfig {
            prediction_type: PredictionType::Sample,
            ..SchedulerKind::Pndm.defaults()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("prediction_type"), "{e}");
    }

    #[test]
    fn steps_run_in_order() {
        let mut s = pndm(false, 5).unwrap();
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&x, 1, &x).is_err());
        s.step(&x, 0, &x).unwrap();
        assert!(s.step(&x, 2, &x).is_err());
        let len = s.timesteps().len();
        assert!(s.step(&x, len, &x).is_err());
        let wrong = Tensor::ones((1, 1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&wrong, 1, &x).is_err());
        // Every step of a full run works, and the run can start over.
        for i in 0..len {
            s.step(&x, i, &x).unwrap();
        }
        s.step(&x, 0, &x).unwrap();
    }
}
