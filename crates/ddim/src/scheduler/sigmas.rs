//! The noise levels of the sigma-parameterised samplers (DPM-Solver, UniPC, DEIS, Euler, Heun,
//! LMS): σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), the Karras et al. 2022 schedule (eq. 5), and the maps
//! between σ and (fractional) timesteps. Arithmetic follows diffusers' numpy code: σ and log σ of
//! the training schedule in float32, everything derived from them in float64.

/// σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for every training timestep, in float32 as diffusers computes it.
pub fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.log` of [`training_sigmas`], in float32.
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|s| s.ln()).collect()
}

/// `np.interp(x, arange(len(fp)), fp)`: fp linearly interpolated at the fractional indices x
/// (clamped to the ends).
pub fn interp(x: &[f64], fp: &[f32]) -> Vec<f64> {
    let last = fp.len().saturating_sub(1);
    x.iter()
        .map(|&v| {
            if fp.is_empty() {
                return f64::NAN;
            }
            if v <= 0.0 {
                return fp[0] as f64;
            }
            if v >= last as f64 {
                return fp[last] as f64;
            }
            let i = v.floor() as usize;
            let (lo, hi) = (fp[i] as f64, fp[i + 1] as f64);
            let w = v - i as f64;
            // numpy: slope * (x - xp[i]) + fp[i]
            (hi - lo) * w + lo
        })
        .collect()
}

/// The Karras et al. 2022 schedule (eq. 5, ρ = 7): n sigmas from `sigma_max` down to
/// `sigma_min`, evenly spaced in σ^(1/ρ).
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(RHO))
        .collect()
}

/// `np.linspace(start, stop, n)` in float64.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        stop
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// The fractional training timestep whose σ is `sigma`: log σ interpolated linearly between the
/// two neighbouring training timesteps (diffusers' `_sigma_to_t`). `log_sigmas` ascend.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log σ is <= log_sigma (0 when none), at most n - 2.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// (α_t, σ_t) of the variance-preserving process at noise level σ: α = 1 / sqrt(σ² + 1),
/// σ_t = σ α.
pub fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α_t - log σ_t, the half log-SNR (+∞ at σ = 0).
pub fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    alpha.ln() - sigma_t.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let ac: Vec<f32> = crate::schedule::alphas_cumprod(
            &crate::schedule::betas_for_schedule(
                crate::schedule::BetaSchedule::Linear,
                1000,
                1e-4,
                0.02,
            )
            .unwrap(),
        );
        let sigmas = training_sigmas(&ac);
        let logs = log_sigmas(&sigmas);
        for t in [0usize, 1, 17, 500, 998, 999] {
            let back = sigma_to_t(sigmas[t] as f64, &logs);
            assert!((back - t as f64).abs() < 1e-3, "{t}: {back}");
        }
        // Between two timesteps, and clamped outside the schedule.
        let mid = ((logs[10] as f64 + logs[11] as f64) / 2.0).exp();
        assert!((sigma_to_t(mid, &logs) - 10.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.0, &logs), 0.0);
        assert_eq!(sigma_to_t(1e9, &logs), 999.0);
    }

    #[test]
    fn karras_ends_at_its_bounds_and_interp_is_numpys() {
        let k = karras(0.1, 10.0, 5);
        assert!((k[0] - 10.0).abs() < 1e-12 && (k[4] - 0.1).abs() < 1e-12);
        assert!(k.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(
            interp(&[0.0, 0.5, 1.0, 7.0, -1.0], &[1.0, 3.0]),
            vec![1.0, 2.0, 3.0, 3.0, 1.0]
        );
        assert_eq!(linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
    }
}
