//! Beta schedules -> `alphas_cumprod`, on plain slices (no tensors): DDPM's linear and sigmoid
//! schedules (Ho et al. 2020), `scaled_linear` (latent diffusion), GLIDE's cosine
//! `squaredcos_cap_v2` (Nichol & Dhariwal 2021, eq. 17) and zero-terminal-SNR rescaling
//! (Lin et al. 2023, arXiv:2305.08891, Algorithm 1).
//!
//! The values follow diffusers' float32 arithmetic step by step (float32 `linspace`, float32
//! `1 - beta`, a cumulative product accumulated in double precision as torch does on the CPU),
//! so `alphas_cumprod` agrees with diffusers to the last bit or two.

use crate::{Error, Result};

/// How betas are laid out over the training timesteps (`beta_schedule` in `scheduler_config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` (DDPM).
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)²` (latent diffusion).
    ScaledLinear,
    /// GLIDE cosine schedule, `alpha_bar(t) = cos²((t/T + 0.008) / 1.008 · π/2)`, betas capped at 0.999.
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6, T)) · (beta_end - beta_start) + beta_start`.
    Sigmoid,
}

impl BetaSchedule {
    /// The names accepted in `scheduler_config.json`.
    pub const NAMES: &'static [&'static str] =
        &["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"];

    /// The diffusers name of this schedule.
    pub fn name(self) -> &'static str {
        match self {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
            BetaSchedule::Sigmoid => "sigmoid",
        }
    }

    /// Parses a diffusers schedule name; the error lists the allowed names.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredcosCapV2),
            "sigmoid" => Ok(BetaSchedule::Sigmoid),
            other => Err(Error::config(
                "beta_schedule",
                format!("{other:?}"),
                format!("allowed: {}", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: float32 arithmetic, the
/// first half counted up from `start`, the second half counted down from `end`.
pub fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Betas of `schedule` over `num_train_timesteps` steps, as float32 like diffusers.
pub fn betas_for_schedule(
    schedule: BetaSchedule,
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
) -> Result<Vec<f32>> {
    if num_train_timesteps == 0 {
        return Err(Error::config(
            "num_train_timesteps",
            0,
            "must be at least 1",
        ));
    }
    let t = num_train_timesteps;
    let betas: Vec<f32> = match schedule {
        BetaSchedule::Linear => linspace_f32(beta_start, beta_end, t),
        BetaSchedule::ScaledLinear => linspace_f32(beta_start.sqrt(), beta_end.sqrt(), t)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredcosCapV2 => cosine_betas(t, 0.999),
        BetaSchedule::Sigmoid => {
            // float32 throughout, as torch.sigmoid on a float32 tensor.
            let scale = (beta_end - beta_start) as f32;
            linspace_f32(-6.0, 6.0, t)
                .into_iter()
                .map(|x| {
                    let s = (1.0 / (1.0 + (-(x as f64)).exp())) as f32;
                    s * scale + beta_start as f32
                })
                .collect()
        }
    };
    check_betas(&betas, "beta_schedule")?;
    Ok(betas)
}

/// GLIDE's cosine schedule (Nichol & Dhariwal 2021, eq. 17): `beta_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta)`,
/// with `ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2)`. Computed in f64 with real division `i / T`
/// (an integer `i / T` would make every beta but the last zero), then rounded to float32.
pub fn cosine_betas(num_train_timesteps: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    let n = num_train_timesteps as f64;
    (0..num_train_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// User-given betas (`trained_betas`), checked for length and range.
pub fn trained_betas(values: &[f64], num_train_timesteps: usize) -> Result<Vec<f32>> {
    if values.len() != num_train_timesteps {
        return Err(Error::config(
            "trained_betas",
            format!("a list of {} values", values.len()),
            format!("must hold num_train_timesteps = {num_train_timesteps} values"),
        ));
    }
    let betas: Vec<f32> = values.iter().map(|&b| b as f32).collect();
    check_betas(&betas, "trained_betas")?;
    Ok(betas)
}

/// Every beta must lie in (0, 1): zero would make a step the identity with a zero-variance
/// posterior, one would erase the signal.
fn check_betas(betas: &[f32], key: &str) -> Result<()> {
    if let Some((i, b)) = betas
        .iter()
        .enumerate()
        .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
    {
        return Err(Error::config(
            key,
            format!("beta[{i}] = {b}"),
            "every beta must lie in the open interval (0, 1); check beta_start and beta_end",
        ));
    }
    Ok(())
}

/// `cumprod(1 - betas)`: `alpha_bar_t`. `1 - beta` is rounded to float32 and the product is
/// accumulated in f64, then rounded per element (torch's CPU `cumprod` on float32).
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1): `sqrt(alpha_bar)` is shifted
/// so its last value is 0 and scaled so its first value is unchanged. float32 like diffusers.
/// The last beta becomes 1 (`alpha_bar_T = 0`: pure noise at t = T).
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = alphas_cumprod(betas);
    let mut sqrt_ab: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_ab.first(), sqrt_ab.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for s in &mut sqrt_ab {
        *s -= last;
        *s *= scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    out.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_endpoints() {
        let v = linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
    }

    #[test]
    fn cosine_schedule_is_not_integer_divided() {
        // With integer division every beta but the last would be 0.
        let b = cosine_betas(1000, 0.999);
        assert!(b[0] > 0.0 && b[500] > b[0]);
        assert_eq!(b[999], 0.999);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let b = betas_for_schedule(BetaSchedule::ScaledLinear, 1000, 0.00085, 0.012).unwrap();
        let r = rescale_zero_terminal_snr(&b);
        let ac = alphas_cumprod(&r);
        assert_eq!(ac[999], 0.0);
        assert!((ac[0] - alphas_cumprod(&b)[0]).abs() < 1e-6);
    }

    #[test]
    fn bad_betas_are_refused() {
        let err = betas_for_schedule(BetaSchedule::Linear, 10, 0.0, 0.02).unwrap_err();
        assert!(err.to_string().contains("(0, 1)"), "{err}");
        let err = betas_for_schedule(BetaSchedule::Linear, 10, 0.1, 1.5).unwrap_err();
        assert!(err.to_string().contains("beta[6] = 1.03"), "{err}");
        let err = trained_betas(&[0.1, 0.2], 3).unwrap_err();
        assert!(err.to_string().contains("3 values"), "{err}");
    }
}
