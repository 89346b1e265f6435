//! AdamW (as `torch.optim.AdamW`), gradient-norm clipping, the learning-rate schedule and the EMA
//! of the weights (a fixed decay or diffusers' `EMAModel` warmup), on flat f32 buffers.

use rayon::prelude::*;

use crate::{Error, Result};

/// AdamW hyper-parameters; the defaults are those of diffusers' `train_unconditional.py`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.95,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-6,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Clone, Debug, Default)]
pub struct Moments {
    /// Exponential average of the gradient.
    pub m: Vec<f32>,
    /// Exponential average of the squared gradient.
    pub v: Vec<f32>,
}

impl Moments {
    /// Zero moments for `n` values.
    pub fn zeros(n: usize) -> Self {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// One AdamW update of `param` in place, as `torch.optim.AdamW` (non-fused, `amsgrad=False`)
/// computes it: `p *= 1 - lr·wd`; `m = β₁m + (1-β₁)g`; `v = β₂v + (1-β₂)g²`;
/// `p -= lr/(1-β₁ᵗ) · m / (sqrt(v)/sqrt(1-β₂ᵗ) + ε)`. `step` counts from 1; `grad_scale`
/// multiplies the gradient first (gradient clipping).
pub fn adamw_update(
    cfg: &AdamWConfig,
    lr: f64,
    step: u64,
    param: &mut [f32],
    grad: &[f32],
    grad_scale: f32,
    state: &mut Moments,
) {
    let bc1 = 1.0 - cfg.beta1.powf(step as f64);
    let bc2 = 1.0 - cfg.beta2.powf(step as f64);
    let step_size = (lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = (1.0 - lr * cfg.weight_decay) as f32;
    let (b1, b2, eps) = (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32);
    const CHUNK: usize = 1 << 14;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(state.m.par_chunks_mut(CHUNK))
        .zip(state.v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = g[i] * grad_scale;
                p[i] *= decay;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] -= step_size * m[i] / denom;
            }
        });
}

/// The factor that scales gradients whose global L2 norm `norm` exceeds `max_norm` down to it
/// (`torch.nn.utils.clip_grad_norm_`: `max_norm / (norm + 1e-6)`, at most 1).
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f32 {
    match max_norm {
        Some(max) if norm.is_finite() => (max / (norm + 1e-6)).min(1.0) as f32,
        _ => 1.0,
    }
}

/// How the learning rate moves over training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// Linear warmup, then constant.
    #[default]
    Constant,
    /// Linear warmup, then a half cosine down to 0 at the last step (diffusers' `cosine`).
    Cosine,
}

impl LrSchedule {
    /// Parses `constant` or `cosine`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(LrSchedule::Constant),
            "cosine" => Ok(LrSchedule::Cosine),
            other => Err(Error::argument("lr-schedule", other, "constant or cosine")),
        }
    }

    /// The name [`LrSchedule::from_name`] reads.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
        }
    }

    /// The learning rate of optimisation step `step` (from 0) of `total`, as diffusers'
    /// `get_scheduler` (transformers' `get_*_schedule_with_warmup`) gives it.
    pub fn lr(self, peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        match self {
            LrSchedule::Constant => peak,
            LrSchedule::Cosine => {
                let progress =
                    (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
        }
    }
}

/// How the EMA decay is chosen at each step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EmaDecay {
    /// The same decay at every step.
    Fixed(f64),
    /// diffusers' `EMAModel(use_ema_warmup=True, inv_gamma, power)`:
    /// `min(max, 1 - (1 + s/inv_gamma)^-power)` with `s = step - 1` (0 at the first step).
    Warmup {
        /// The largest decay.
        max: f64,
        /// `inv_gamma` (diffusers' default 1).
        inv_gamma: f64,
        /// `power` (diffusers' `train_unconditional.py` default 3/4).
        power: f64,
    },
}

impl EmaDecay {
    /// The decay for optimisation step `step` (counted from 1, as `EMAModel.optimization_step`).
    pub fn decay(self, step: u64) -> f64 {
        match self {
            EmaDecay::Fixed(d) => d,
            EmaDecay::Warmup {
                max,
                inv_gamma,
                power,
            } => {
                let s = step.saturating_sub(1) as f64;
                if s <= 0.0 {
                    return 0.0;
                }
                (1.0 - (1.0 + s / inv_gamma).powf(-power)).clamp(0.0, max)
            }
        }
    }
}

/// `ema = decay·ema + (1 - decay)·param`, in place.
pub fn ema_update(ema: &mut [f32], param: &[f32], decay: f64) {
    let d = decay as f32;
    ema.par_chunks_mut(1 << 14)
        .zip(param.par_chunks(1 << 14))
        .for_each(|(e, p)| {
            for (e, &p) in e.iter_mut().zip(p) {
                *e -= (1.0 - d) * (*e - p);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01),
        // p = [1., -2.], grads [0.5, -1.0] then [0.25, 3.0]: after step 1 p = [0.899, -1.898],
        // after step 2 p = [0.8047562, -1.9454318] (torch 2.15, float32).
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut p = vec![1.0f32, -2.0];
        let mut st = Moments::zeros(2);
        adamw_update(&cfg, 0.1, 1, &mut p, &[0.5, -1.0], 1.0, &mut st);
        assert!(
            (p[0] - 0.899).abs() < 1e-6 && (p[1] + 1.898).abs() < 1e-6,
            "{p:?}"
        );
        adamw_update(&cfg, 0.1, 2, &mut p, &[0.25, 3.0], 1.0, &mut st);
        assert!(
            (p[0] - 0.804_756_2).abs() < 1e-6 && (p[1] + 1.945_431_8).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Constant.lr(1.0, 0, 10, 100), 0.0);
        assert_eq!(LrSchedule::Constant.lr(1.0, 5, 10, 100), 0.5);
        assert_eq!(LrSchedule::Constant.lr(1.0, 50, 10, 100), 1.0);
        assert_eq!(LrSchedule::Cosine.lr(1.0, 10, 10, 110), 1.0);
        assert!((LrSchedule::Cosine.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(LrSchedule::Cosine.lr(1.0, 110, 10, 110).abs() < 1e-12);
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert!((clip_factor(4.0, Some(1.0)) - 0.25).abs() < 1e-6);
        assert_eq!(clip_factor(4.0, None), 1.0);

        let warm = EmaDecay::Warmup {
            max: 0.9999,
            inv_gamma: 1.0,
            power: 0.75,
        };
        assert_eq!(warm.decay(1), 0.0);
        // 1 - 2^-0.75
        assert!((warm.decay(2) - 0.405_396_4).abs() < 1e-6);
        assert_eq!(warm.decay(100_000_000), 0.9999);
        let mut ema = vec![0.0f32, 1.0];
        ema_update(&mut ema, &[1.0, 1.0], 0.75);
        assert_eq!(ema, vec![0.25, 1.0]);
    }
}
