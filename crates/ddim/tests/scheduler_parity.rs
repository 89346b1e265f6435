//! Scheduler parity with diffusers 0.42: fixtures made by `tools/fixtures/scheduler_fixtures.py`
//! (alphas_cumprod of every schedule, timesteps of every spacing, full sampling and inversion
//! loops with diffusers' dummy model `x · t / (t + 1)`), plus the golden numbers of diffusers'
//! own test suite (tests/schedulers/test_scheduler_ddim.py, test_scheduler_ddim_inverse.py).

use candle_core::{Device, Tensor};
use ddim::rng::TorchGenerator;
use ddim::scheduler::{
    DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DdimStepOptions, SchedulerConfig,
    TimestepSpacing,
};
use serde_json::Value;

fn fixtures() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/schedulers/schedulers.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file")).expect("json")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as usize)
        .collect()
}

fn config(v: &Value) -> SchedulerConfig {
    SchedulerConfig::from_json(v).expect("config").config
}

/// diffusers' `dummy_sample_deter` for (b, c, h, w): arange(n) laid out as (c, h, w, b), / n,
/// permuted to (b, c, h, w).
fn dummy_sample(b: usize, c: usize, h: usize, w: usize, scale: f32) -> Tensor {
    let n = b * c * h * w;
    let mut data = vec![0f32; n];
    for bi in 0..b {
        for ci in 0..c {
            for hi in 0..h {
                for wi in 0..w {
                    let src = ((ci * h + hi) * w + wi) * b + bi;
                    data[((bi * c + ci) * h + hi) * w + wi] = src as f32 / n as f32 * scale;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, c, h, w), &Device::Cpu).unwrap()
}

/// diffusers' dummy model: `x · t / (t + 1)` in float32.
fn dummy_model(x: &Tensor, t: usize) -> Tensor {
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let t = t as f32;
    let out: Vec<f32> = v.iter().map(|&x| x * t / (t + 1.0)).collect();
    Tensor::from_vec(out, x.dims(), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn noise(g: &mut TorchGenerator, like: &Tensor) -> Tensor {
    Tensor::from_vec(g.randn(like.elem_count()), like.dims(), &Device::Cpu).unwrap()
}

#[test]
fn alphas_cumprod_match_diffusers_for_every_schedule() {
    let fx = fixtures();
    for (name, case) in fx["alphas_cumprod"].as_object().unwrap() {
        let cfg = config(&case["config"]);
        let ours = DDPMScheduler::new(&cfg).unwrap();
        let expected = f32s(&case["alphas_cumprod"]);
        let diff = max_abs_diff(ours.alphas_cumprod(), &expected);
        assert!(diff <= 1e-6, "{name}: max |Δ alphas_cumprod| = {diff:e}");
    }
}

#[test]
fn timesteps_match_diffusers_for_every_spacing() {
    let fx = fixtures();
    for case in fx["timesteps"].as_array().unwrap() {
        let spacing = TimestepSpacing::from_name(case["spacing"].as_str().unwrap()).unwrap();
        let cfg = SchedulerConfig {
            num_train_timesteps: case["T"].as_u64().unwrap() as usize,
            steps_offset: case["steps_offset"].as_u64().unwrap() as usize,
            timestep_spacing: spacing,
            ..Default::default()
        };
        let n = case["N"].as_u64().unwrap() as usize;
        let mut s = DDIMScheduler::new(&cfg).unwrap();
        s.set_timesteps(n).unwrap();
        assert_eq!(s.timesteps(), usizes(&case["timesteps"]), "{case}");
        if let Some(inv) = case.get("inverse_timesteps") {
            let mut s = DDIMInverseScheduler::new(&cfg).unwrap();
            s.set_timesteps(n).unwrap();
            assert_eq!(s.timesteps(), usizes(inv), "inverse {case}");
        }
    }
}

#[test]
fn full_loops_match_diffusers() {
    let fx = fixtures();
    let mut worst = (0.0f32, String::new());
    for case in fx["loops"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = config(&case["config"]);
        let scale = case
            .get("sample_scale")
            .and_then(Value::as_f64)
            .unwrap_or(1.0) as f32;
        let mut x = dummy_sample(2, 3, 4, 4, scale);
        let seed = case.get("noise_seed").and_then(Value::as_u64);
        let mut g = TorchGenerator::new(seed.unwrap_or(0));
        match case["kind"].as_str().unwrap() {
            "ddim" => {
                let mut s = DDIMScheduler::new(&cfg).unwrap();
                s.set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
                    .unwrap();
                let eta = case["eta"].as_f64().unwrap();
                let clipped = case
                    .get("use_clipped_model_output")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                for &t in s.timesteps() {
                    let out = dummy_model(&x, t);
                    let z = (eta > 0.0).then(|| noise(&mut g, &x));
                    x = s
                        .step(
                            &out,
                            t,
                            &x,
                            &DdimStepOptions {
                                eta,
                                use_clipped_model_output: clipped,
                            },
                            z.as_ref(),
                        )
                        .unwrap()
                        .prev_sample;
                }
            }
            "ddpm" => {
                let mut s = DDPMScheduler::new(&cfg).unwrap();
                match case.get("custom_timesteps").filter(|v| !v.is_null()) {
                    Some(ts) => s.set_custom_timesteps(&usizes(ts)).unwrap(),
                    None => s
                        .set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
                        .unwrap(),
                }
                let vt = cfg.variance_type.unwrap().name();
                for &t in s.timesteps() {
                    let eps = dummy_model(&x, t);
                    let out = match vt {
                        "learned" => {
                            let v = ((x.ones_like().unwrap() * 0.5).unwrap() * (t as f64 + 1.0))
                                .unwrap();
                            Tensor::cat(&[&eps, &(v / 1000.0).unwrap()], 1).unwrap()
                        }
                        "learned_range" => {
                            let v = x.affine(4.0, -1.0).unwrap().tanh().unwrap();
                            Tensor::cat(&[&eps, &v], 1).unwrap()
                        }
                        _ => eps,
                    };
                    let z = (t > 0).then(|| noise(&mut g, &x));
                    x = s.step(&out, t, &x, z.as_ref()).unwrap().prev_sample;
                }
            }
            "inverse" => {
                let mut s = DDIMInverseScheduler::new(&cfg).unwrap();
                s.set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
                    .unwrap();
                for &t in s.timesteps() {
                    let out = dummy_model(&x, t);
                    x = s.step(&out, t, &x).unwrap().prev_sample;
                }
            }
            other => panic!("unknown kind {other}"),
        }
        let expected = f32s(&case["final"]);
        let diff = max_abs_diff(&values(&x), &expected);
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert!(
            diff <= 2e-5 * scale,
            "{name} ({}): max |Δ| = {diff:e}",
            case["source"]
        );
        if diff > worst.0 {
            worst = (diff, name.to_string());
        }
    }
    eprintln!(
        "largest difference over all loops: {:e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn add_noise_and_velocity_match_diffusers() {
    let fx = fixtures();
    let case = &fx["add_noise"];
    let s = DDIMScheduler::new(&SchedulerConfig::default()).unwrap();
    let x0 = dummy_sample(2, 3, 4, 4, 1.0);
    let mut g = TorchGenerator::new(case["noise_seed"].as_u64().unwrap());
    let z = noise(&mut g, &x0);
    let ts = usizes(&case["timesteps"]);
    let noisy = values(&s.add_noise(&x0, &z, &ts).unwrap());
    assert!(max_abs_diff(&noisy, &f32s(&case["noisy"])) <= 1e-6);
    let v = values(&s.get_velocity(&x0, &z, &ts).unwrap());
    assert!(max_abs_diff(&v, &f32s(&case["velocity"])) <= 1e-6);
}

#[test]
fn ddim_variance_matches_diffusers() {
    let fx = fixtures();
    let s = DDIMScheduler::new(&SchedulerConfig::default()).unwrap();
    for case in fx["ddim_variance"].as_array().unwrap() {
        let t = case["t"].as_u64().unwrap() as usize;
        let prev = case["prev"].as_i64().unwrap();
        let prev = (prev >= 0).then_some(prev as usize);
        let v = s.variance(t, prev).unwrap();
        let expected = case["variance"].as_f64().unwrap() as f32;
        assert!(
            (v - expected).abs() <= 1e-7,
            "({t}, {prev:?}): {v} vs {expected}"
        );
    }
}

// --- The golden numbers of diffusers' own test suite (768-element sample, 10 steps). ---

fn sums(x: &Tensor) -> (f32, f32) {
    let v = values(x);
    let s: f64 = v.iter().map(|x| x.abs() as f64).sum();
    (s as f32, (s / v.len() as f64) as f32)
}

fn diffusers_test_config(extra: &str) -> SchedulerConfig {
    // get_scheduler_config() of test_scheduler_ddim.py
    let text = format!(
        r#"{{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "clip_sample": true {extra}}}"#
    );
    SchedulerConfig::from_json_str(&text).unwrap().config
}

fn ddim_full_loop(cfg: &SchedulerConfig) -> Tensor {
    let mut s = DDIMScheduler::new(cfg).unwrap();
    s.set_timesteps(10).unwrap();
    let mut x = dummy_sample(4, 3, 8, 8, 1.0);
    for &t in s.timesteps() {
        let out = dummy_model(&x, t);
        x = s
            .step(&out, t, &x, &DdimStepOptions::with_eta(0.0), None)
            .unwrap()
            .prev_sample;
    }
    x
}

fn inverse_full_loop(cfg: &SchedulerConfig) -> Tensor {
    let mut s = DDIMInverseScheduler::new(cfg).unwrap();
    s.set_timesteps(10).unwrap();
    let mut x = dummy_sample(4, 3, 8, 8, 1.0);
    for &t in s.timesteps() {
        let out = dummy_model(&x, t);
        x = s.step(&out, t, &x).unwrap().prev_sample;
    }
    x
}

fn assert_sums(x: &Tensor, sum: f32, mean: f32, what: &str) {
    let (s, m) = sums(x);
    assert!(
        (s - sum).abs() < 1e-2,
        "{what}: Σ|x| = {s}, diffusers {sum}"
    );
    assert!(
        (m - mean).abs() < 1e-3,
        "{what}: mean|x| = {m}, diffusers {mean}"
    );
}

#[test]
fn diffusers_suite_ddim_full_loop() {
    // test_full_loop_no_noise: 172.0067 / 0.223967
    assert_sums(
        &ddim_full_loop(&diffusers_test_config("")),
        172.0067,
        0.223967,
        "default",
    );
    // test_full_loop_with_v_prediction: 52.5302 / 0.0684
    let cfg = diffusers_test_config(r#", "prediction_type": "v_prediction""#);
    assert_sums(&ddim_full_loop(&cfg), 52.5302, 0.0684, "v_prediction");
    // test_full_loop_with_set_alpha_to_one / _no_set_alpha_to_one (beta_start=0.01)
    let cfg = diffusers_test_config(r#", "set_alpha_to_one": true, "beta_start": 0.01"#);
    assert_sums(&ddim_full_loop(&cfg), 149.8295, 0.1951, "set_alpha_to_one");
    let cfg = diffusers_test_config(r#", "set_alpha_to_one": false, "beta_start": 0.01"#);
    assert_sums(
        &ddim_full_loop(&cfg),
        149.0784,
        0.1941,
        "no set_alpha_to_one",
    );
}

#[test]
fn diffusers_suite_ddim_variance() {
    // test_variance: _get_variance(t, prev) of the default config
    let s = DDIMScheduler::new(&diffusers_test_config("")).unwrap();
    for (t, prev, expected) in [
        (0, 0, 0.0f32),
        (420, 400, 0.14771),
        (980, 960, 0.32460),
        (487, 486, 0.00979),
        (999, 998, 0.02),
    ] {
        let v = s.variance(t, Some(prev)).unwrap();
        assert!((v - expected).abs() < 1e-5, "variance({t}, {prev}) = {v}");
    }
}

#[test]
fn diffusers_suite_steps_offset() {
    // test_steps_offset: N = 5, steps_offset = 1 -> [801, 601, 401, 201, 1]
    let mut s = DDIMScheduler::new(&diffusers_test_config(r#", "steps_offset": 1"#)).unwrap();
    s.set_timesteps(5).unwrap();
    assert_eq!(s.timesteps(), &[801, 601, 401, 201, 1]);
}

#[test]
fn diffusers_suite_inverse_full_loop() {
    // test_scheduler_ddim_inverse.py: 671.6816 / 1394.2185 / 539.9622 / 542.6722
    let x = inverse_full_loop(&diffusers_test_config(""));
    assert!((sums(&x).0 - 671.6816).abs() < 1e-2, "{}", sums(&x).0);
    let cfg = diffusers_test_config(r#", "prediction_type": "v_prediction""#);
    let x = inverse_full_loop(&cfg);
    assert!((sums(&x).0 - 1394.2185).abs() < 1e-2, "{}", sums(&x).0);
    let cfg = diffusers_test_config(r#", "set_alpha_to_one": true, "beta_start": 0.01"#);
    let x = inverse_full_loop(&cfg);
    assert!((sums(&x).0 - 539.9622).abs() < 1e-2, "{}", sums(&x).0);
    let cfg = diffusers_test_config(r#", "set_alpha_to_one": false, "beta_start": 0.01"#);
    let x = inverse_full_loop(&cfg);
    assert!((sums(&x).0 - 542.6722).abs() < 1e-2, "{}", sums(&x).0);
}
