//! Properties the schedulers must have whatever diffusers does, and the validation of bad input.

use candle_core::{DType, Device, Tensor};
use ddim::rng::TorchGenerator;
use ddim::scheduler::{
    spaced_timesteps, DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DdimStepOptions,
    PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing, VarianceType,
};

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(TorchGenerator::new(seed).randn(n), dims, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn ddim_with_eta_one_has_ddpm_posterior_variance() {
    // DDIM eq. 16 at η = 1 is DDPM's posterior variance β̃_t, for every step of a strided schedule.
    let cfg = SchedulerConfig::default();
    let mut ddim = DDIMScheduler::new(&cfg).unwrap();
    let mut ddpm = DDPMScheduler::new(&cfg).unwrap();
    for spacing_steps in [1000, 50, 7] {
        ddim.set_timesteps(spacing_steps).unwrap();
        ddpm.set_timesteps(spacing_steps).unwrap();
        assert_eq!(ddim.timesteps(), ddpm.timesteps());
        for &t in ddim.timesteps() {
            let prev = ddim.previous_timestep(t).unwrap();
            if prev.is_none() {
                continue; // after the last step DDIM uses final_alpha_cumprod, DDPM uses 1 too
            }
            let v_ddim = ddim.variance(t, prev).unwrap();
            let v_ddpm = ddpm.variance(t).unwrap();
            assert!(
                (v_ddim - v_ddpm).abs() <= 1e-6 * v_ddpm.max(1e-3),
                "t = {t}: {v_ddim} vs {v_ddpm}"
            );
        }
    }
}

#[test]
fn ddim_eta_one_step_equals_ddpm_step_with_same_noise() {
    // With η = 1 and the same noise, a DDIM step and a fixed_small DDPM step give the same x_{t-1}.
    let cfg = SchedulerConfig {
        clip_sample: false,
        ..Default::default()
    };
    let mut ddim = DDIMScheduler::new(&cfg).unwrap();
    let mut ddpm = DDPMScheduler::new(&cfg).unwrap();
    ddim.set_timesteps(20).unwrap();
    ddpm.set_timesteps(20).unwrap();
    let x = randn(1, &[2, 3, 8, 8]);
    let eps = randn(2, &[2, 3, 8, 8]);
    let z = randn(3, &[2, 3, 8, 8]);
    for &t in &ddim.timesteps()[..19] {
        let a = ddim
            .step(&eps, t, &x, &DdimStepOptions::with_eta(1.0), Some(&z))
            .unwrap()
            .prev_sample;
        let b = ddpm.step(&eps, t, &x, Some(&z)).unwrap().prev_sample;
        let d = max_abs(&(a - b).unwrap());
        assert!(d < 2e-5, "t = {t}: {d}");
    }
}

#[test]
fn add_noise_then_x0_formula_recovers_x0() {
    for pred in [PredictionType::Epsilon, PredictionType::VPrediction] {
        let cfg = SchedulerConfig {
            clip_sample: false,
            prediction_type: pred,
            beta_schedule: ddim::schedule::BetaSchedule::SquaredcosCapV2,
            ..Default::default()
        };
        let s = DDIMScheduler::new(&cfg).unwrap();
        let x0 = randn(4, &[3, 2, 4, 4]);
        let eps = randn(5, &[3, 2, 4, 4]);
        let ts = [10, 500, 900];
        let xt = s.add_noise(&x0, &eps, &ts).unwrap();
        let target = match pred {
            PredictionType::Epsilon => eps.clone(),
            _ => s.get_velocity(&x0, &eps, &ts).unwrap(),
        };
        for (i, &t) in ts.iter().enumerate() {
            let mut one = DDIMScheduler::new(&cfg).unwrap();
            one.set_timesteps(1000).unwrap();
            let out = one
                .step(
                    &target.narrow(0, i, 1).unwrap(),
                    t,
                    &xt.narrow(0, i, 1).unwrap(),
                    &DdimStepOptions::with_eta(0.0),
                    None,
                )
                .unwrap();
            let d = max_abs(&(out.pred_original_sample - x0.narrow(0, i, 1).unwrap()).unwrap());
            assert!(d < 2e-3, "{pred} t = {t}: |x̂0 - x0| = {d}");
        }
    }
}

#[test]
fn inverting_a_forward_pass_with_known_epsilon_returns_the_start() {
    // A model whose ε̂ is the same everywhere: DDIM (η = 0) from x_T and its inverse from the result
    // visit the same noise levels, so the inversion lands back on x_T.
    for spacing in [
        TimestepSpacing::Leading,
        TimestepSpacing::Trailing,
        TimestepSpacing::Linspace,
    ] {
        let cfg = SchedulerConfig {
            clip_sample: false,
            set_alpha_to_one: false,
            timestep_spacing: spacing,
            ..Default::default()
        };
        let mut fwd = DDIMScheduler::new(&cfg).unwrap();
        let mut inv = DDIMInverseScheduler::new(&cfg).unwrap();
        fwd.set_timesteps(13).unwrap();
        inv.set_timesteps(13).unwrap();
        let eps = randn(6, &[1, 3, 8, 8]);
        let x_t = {
            // x_T consistent with ε at the first timestep: sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε.
            let x0 = randn(7, &[1, 3, 8, 8]).affine(0.5, 0.0).unwrap();
            fwd.add_noise(&x0, &eps, &[fwd.timesteps()[0]]).unwrap()
        };
        let mut x = x_t.clone();
        for &t in fwd.timesteps() {
            x = fwd
                .step(&eps, t, &x, &DdimStepOptions::with_eta(0.0), None)
                .unwrap()
                .prev_sample;
        }
        for &t in inv.timesteps() {
            x = inv.step(&eps, t, &x).unwrap().prev_sample;
        }
        let d = max_abs(&(x - &x_t).unwrap());
        assert!(d < 1e-4, "{spacing}: |x_T' - x_T| = {d}");
    }
}

#[test]
fn previous_timestep_is_read_off_the_schedule() {
    // diffusers#12633: for linspace, t - T // N misses the schedule; ours follows it.
    let cfg = SchedulerConfig {
        timestep_spacing: TimestepSpacing::Linspace,
        ..Default::default()
    };
    let mut s = DDIMScheduler::new(&cfg).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(
        s.timesteps(),
        &[999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    );
    assert_eq!(s.previous_timestep(999).unwrap(), Some(888));
    assert_eq!(s.previous_timestep(0).unwrap(), None);
    // trailing with N not dividing T
    let cfg = SchedulerConfig {
        timestep_spacing: TimestepSpacing::Trailing,
        ..Default::default()
    };
    let mut s = DDIMScheduler::new(&cfg).unwrap();
    s.set_timesteps(3).unwrap();
    assert_eq!(s.timesteps(), &[999, 666, 332]);
    assert_eq!(s.previous_timestep(666).unwrap(), Some(332));
    let err = s.previous_timestep(500).unwrap_err().to_string();
    assert!(err.contains("500") && err.contains("schedule"), "{err}");
}

#[test]
fn quad_spacing_follows_the_official_ddim_code() {
    // seq = [int(s) for s in linspace(0, sqrt(0.8 T), S) ** 2], visited in reverse
    let ts = spaced_timesteps(TimestepSpacing::Quad, 1000, 10, 0).unwrap();
    let expected: Vec<usize> = (0..10)
        .map(|i| {
            let s = (800f64).sqrt() * i as f64 / 9.0;
            let s = if i == 9 { 800f64.sqrt() } else { s };
            (s * s) as usize
        })
        .rev()
        .collect();
    assert_eq!(ts, expected);
    assert_eq!(ts[0], 800); // sqrt(800)² rounds up to 800.0000000000001 in numpy too
    assert_eq!(*ts.last().unwrap(), 0);
    // Large N: repeated small values merge, the list stays strictly descending.
    let ts = spaced_timesteps(TimestepSpacing::Quad, 1000, 100, 0).unwrap();
    assert_eq!(ts.len(), 96); // len(set(...)) in numpy
    assert!(ts.windows(2).all(|w| w[0] > w[1]));
}

#[test]
fn bad_step_counts_and_eta_are_refused() {
    let mut s = DDIMScheduler::new(&SchedulerConfig::default()).unwrap();
    for n in [0, 1001, 100000] {
        let err = s.set_timesteps(n).unwrap_err().to_string();
        assert!(
            err.contains(&n.to_string()) && err.contains("1000"),
            "{err}"
        );
    }
    s.set_timesteps(10).unwrap();
    let x = randn(1, &[1, 3, 4, 4]);
    for eta in [-1.0, f64::NAN, f64::INFINITY] {
        let err = s
            .step(&x, 900, &x, &DdimStepOptions::with_eta(eta), Some(&x))
            .unwrap_err()
            .to_string();
        assert!(err.contains("eta"), "{err}");
    }
    let err = s
        .step(&x, 900, &x, &DdimStepOptions::with_eta(0.5), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("variance_noise"), "{err}");
    let err = s
        .step(&x, 900, &x, &DdimStepOptions::with_eta(3.0), Some(&x))
        .unwrap_err()
        .to_string();
    assert!(err.contains("too large"), "{err}");
    let wrong = randn(1, &[1, 3, 4, 5]);
    let err = s
        .step(&wrong, 900, &x, &DdimStepOptions::with_eta(0.0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape"), "{err}");
    // steps_offset past the end
    let mut s = DDIMScheduler::new(&SchedulerConfig {
        steps_offset: 5,
        ..Default::default()
    })
    .unwrap();
    assert!(s.set_timesteps(1000).is_err());
    // DDPM: noise is required above t = 0
    let mut p = DDPMScheduler::new(&SchedulerConfig::default()).unwrap();
    p.set_timesteps(10).unwrap();
    assert!(p.step(&x, 900, &x, None).is_err());
    assert!(p.set_custom_timesteps(&[10, 20]).is_err());
    assert!(p.set_custom_timesteps(&[1000, 20]).is_err());
}

#[test]
fn unknown_names_list_the_allowed_ones() {
    for (key, allowed) in [
        ("beta_schedule", "squaredcos_cap_v2"),
        ("timestep_spacing", "trailing"),
        ("prediction_type", "v_prediction"),
        ("variance_type", "learned_range"),
    ] {
        let text = format!(r#"{{"{key}": "bogus"}}"#);
        let err = SchedulerConfig::from_json_str(&text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(key) && err.contains("bogus") && err.contains(allowed),
            "{err}"
        );
    }
}

#[test]
fn bad_betas_are_refused() {
    let err = DDIMScheduler::new(&SchedulerConfig {
        beta_end: 1.2,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("(0, 1)"), "{err}");
    let err = SchedulerConfig::from_json_str(
        r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}"#,
    )
    .and_then(|c| DDIMScheduler::new(&c.config))
    .unwrap_err()
    .to_string();
    assert!(err.contains("trained_betas") && err.contains("3"), "{err}");
    let err = SchedulerConfig::from_json_str(
        r#"{"num_train_timesteps": 2, "trained_betas": [0.1, 1.0]}"#,
    )
    .and_then(|c| DDIMScheduler::new(&c.config))
    .unwrap_err()
    .to_string();
    assert!(err.contains("beta[1]"), "{err}");
    let err = SchedulerConfig::from_json_str(r#"{"beta_start": "x"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("beta_start") && err.contains("number"),
        "{err}"
    );
    assert!(SchedulerConfig::from_json_str("[1, 2]").is_err());
    assert!(SchedulerConfig::from_json_str("{\"beta_start\": ").is_err());
}

#[test]
fn zero_terminal_snr_with_epsilon_is_refused_at_t_max() {
    // diffusers returns inf (huggingface/diffusers#3851); we refuse with a message.
    let cfg = SchedulerConfig {
        rescale_betas_zero_snr: true,
        timestep_spacing: TimestepSpacing::Trailing,
        ..Default::default()
    };
    let mut s = DDIMScheduler::new(&cfg).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps()[0], 999);
    let x = randn(1, &[1, 3, 4, 4]);
    let err = s
        .step(&x, 999, &x, &DdimStepOptions::with_eta(0.0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("zero terminal SNR"), "{err}");
    // later steps are fine, and v_prediction works at t = T
    assert!(s
        .step(&x, 899, &x, &DdimStepOptions::with_eta(0.0), None)
        .is_ok());
    let mut v = DDIMScheduler::new(&SchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..cfg
    })
    .unwrap();
    v.set_timesteps(10).unwrap();
    let out = v
        .step(&x, 999, &x, &DdimStepOptions::with_eta(0.0), None)
        .unwrap();
    assert!(max_abs(&out.prev_sample).is_finite());
}

#[test]
fn inversion_of_a_sample_model_from_alpha_one_is_refused() {
    // ε̂ = (x - x̂0) / sqrt(1 - 1): diffusers returns NaN.
    let cfg = SchedulerConfig {
        prediction_type: PredictionType::Sample,
        ..Default::default()
    };
    let mut s = DDIMInverseScheduler::new(&cfg).unwrap();
    s.set_timesteps(10).unwrap();
    let x = randn(1, &[1, 3, 4, 4]);
    let err = s.step(&x, 0, &x).unwrap_err().to_string();
    assert!(err.contains("set_alpha_to_one"), "{err}");
}

#[test]
fn fixed_large_log_is_finite_and_equals_fixed_large() {
    // diffusers takes the square root of log β_t (NaN); the variance meant is β_t.
    let run = |vt| {
        let mut s = DDPMScheduler::new(&SchedulerConfig {
            variance_type: Some(vt),
            ..Default::default()
        })
        .unwrap();
        s.set_timesteps(10).unwrap();
        let mut x = randn(1, &[1, 3, 4, 4]);
        let mut g = TorchGenerator::new(9);
        for &t in s.timesteps().to_vec().iter() {
            let z = Tensor::from_vec(g.randn(x.elem_count()), x.dims(), &Device::Cpu).unwrap();
            let eps = x.affine(0.1, 0.0).unwrap();
            x = s.step(&eps, t, &x, Some(&z)).unwrap().prev_sample;
        }
        x
    };
    let a = run(VarianceType::FixedLargeLog);
    let b = run(VarianceType::FixedLarge);
    assert!(max_abs(&a).is_finite());
    assert!(max_abs(&(a - b).unwrap()) < 1e-5);
}

#[test]
fn learned_variance_needs_two_c_channels() {
    let mut s = DDPMScheduler::new(&SchedulerConfig {
        variance_type: Some(VarianceType::LearnedRange),
        ..Default::default()
    })
    .unwrap();
    s.set_timesteps(10).unwrap();
    let x = randn(1, &[1, 3, 4, 4]);
    let err = s.step(&x, 900, &x, Some(&x)).unwrap_err().to_string();
    assert!(err.contains("2 x 3 channels"), "{err}");
}

#[test]
fn fused_cpu_step_equals_tensor_ops_step() {
    // The fused CPU loop and the candle-ops path (used on CUDA/Metal and for other dtypes) agree:
    // a strided (transposed) input takes the tensor path on the CPU too.
    for (pred, thresholding, clipped) in [
        (PredictionType::Epsilon, false, false),
        (PredictionType::Sample, true, true),
        (PredictionType::VPrediction, false, true),
    ] {
        let cfg = SchedulerConfig {
            prediction_type: pred,
            thresholding,
            sample_max_value: 2.0,
            ..Default::default()
        };
        let mut s = DDIMScheduler::new(&cfg).unwrap();
        s.set_timesteps(10).unwrap();
        let x = randn(1, &[2, 3, 6, 5]).affine(3.0, 0.0).unwrap();
        let m = randn(2, &[2, 3, 6, 5]);
        let z = randn(3, &[2, 3, 6, 5]);
        let a = s
            .step(
                &m,
                500,
                &x,
                &DdimStepOptions {
                    eta: 0.7,
                    use_clipped_model_output: clipped,
                },
                Some(&z),
            )
            .unwrap();
        // Same values, non-contiguous layout.
        let strided = |t: &Tensor| {
            t.transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap()
        };
        assert!(!strided(&x).is_contiguous());
        let b = s
            .step(
                &strided(&m),
                500,
                &strided(&x),
                &DdimStepOptions {
                    eta: 0.7,
                    use_clipped_model_output: clipped,
                },
                Some(&strided(&z)),
            )
            .unwrap();
        let d1 = max_abs(&(a.prev_sample - b.prev_sample).unwrap());
        let d2 = max_abs(&(a.pred_original_sample - b.pred_original_sample).unwrap());
        assert!(d1 < 1e-5 && d2 < 1e-5, "{pred}: {d1} {d2}");
    }
    // f64 samples take the tensor path and keep their dtype.
    let mut s = DDIMScheduler::new(&SchedulerConfig::default()).unwrap();
    s.set_timesteps(10).unwrap();
    let x = randn(1, &[1, 3, 4, 4]).to_dtype(DType::F64).unwrap();
    let out = s
        .step(&x, 900, &x, &DdimStepOptions::with_eta(0.0), None)
        .unwrap();
    assert_eq!(out.prev_sample.dtype(), DType::F64);
}

#[test]
fn config_files_load_like_diffusers() {
    // A DDPM config (google/ddpm-cifar10-32) builds a DDIM scheduler as DDIMScheduler.from_config does.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hub-configs");
    let loaded = SchedulerConfig::from_file(format!(
        "{dir}/google--ddpm-cifar10-32/scheduler_config.json"
    ))
    .unwrap();
    assert!(loaded.unknown_keys.is_empty(), "{:?}", loaded.unknown_keys);
    let cfg = loaded.config;
    assert_eq!(cfg.kind(), Some(SchedulerKind::Ddpm));
    assert_eq!(cfg.variance_type, Some(VarianceType::FixedLarge));
    let s = DDIMScheduler::new(&cfg).unwrap();
    assert_eq!(s.final_alpha_cumprod(), 1.0); // set_alpha_to_one's default
                                              // The legacy GaussianDDPMScheduler file with `timesteps` and `timestep_values`.
    let legacy =
        SchedulerConfig::from_file(format!("{dir}/legacy-gaussian-ddpm-scheduler_config.json"))
            .unwrap();
    assert_eq!(legacy.config.num_train_timesteps, 1000);
    assert_eq!(legacy.config.kind(), Some(SchedulerKind::Ddpm));
    assert!(legacy.unknown_keys.is_empty(), "{:?}", legacy.unknown_keys);
    // Unknown keys are reported, not fatal; missing keys take the defaults.
    // (skip_prk_steps, once unknown, is PNDMScheduler's and known now.)
    let l = SchedulerConfig::from_json_str(
        r#"{"skip_prk_steps": true, "not_a_diffusers_key": 1, "beta_end": 0.012}"#,
    )
    .unwrap();
    assert_eq!(l.unknown_keys, vec!["not_a_diffusers_key".to_string()]);
    assert!(l.config.skip_prk_steps);
    assert_eq!(l.config.beta_end, 0.012);
    assert_eq!(l.config.beta_start, 0.0001);
    // Written back and read again: the same config.
    let text = serde_json::to_string(&cfg.to_json(SchedulerKind::Ddim)).unwrap();
    let again = SchedulerConfig::from_json_str(&text).unwrap();
    assert!(again.unknown_keys.is_empty());
    assert_eq!(again.config.kind(), Some(SchedulerKind::Ddim));
    assert_eq!(
        SchedulerConfig {
            class_name: None,
            ..again.config
        },
        SchedulerConfig {
            class_name: None,
            variance_type: Some(VarianceType::FixedSmall), // DDIMScheduler has no variance_type key
            ..cfg
        }
    );
}
