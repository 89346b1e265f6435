//! Every sampler against diffusers 0.42: the fixtures (tools/fixtures/sampler_fixtures.py) run
//! diffusers' pipeline loop over a nonlinear dummy model and keep every step's sample; here the
//! same configs run through `scheduler::build` and the one sampling loop
//! (`pipeline::denoise_with`). Stochastic cases draw from the torch-compatible generator with
//! the case's seed, as diffusers' `generator` does. The tolerance is relative to the largest
//! magnitude of the expected sample: the file's `tolerance` (1e-4 when absent), or a case's own.

use candle_core::{Device, Tensor};
use ddim::pipeline::{denoise_with, Generator};
use ddim::scheduler::{build, DdimStepOptions, SchedulerConfig, SchedulerKind};
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/samplers");
const SHAPE: [usize; 4] = [2, 2, 3, 3];

fn x_start() -> Tensor {
    let n: usize = SHAPE.iter().product();
    let v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32 * 4.0 - 2.0).collect();
    Tensor::from_vec(v, &SHAPE, &Device::Cpu).unwrap()
}

/// The fixtures' dummy model: 0.5 sin(3x) + x · t / (t + 1000).
fn model(x: &Tensor, t: f64) -> ddim::Result<Tensor> {
    let wave = x.affine(3.0, 0.0)?.sin()?.affine(0.5, 0.0)?;
    Ok((wave + x.affine(t / (t + 1000.0), 0.0)?)?)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| ddim::json::as_f64(x).unwrap())
        .collect()
}

/// Runs one case; returns a description of the first mismatch.
fn check_case(case: &Value, tol: f64) -> Result<(), String> {
    let class = case["class"].as_str().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let mut config_json = case["config"].clone();
    config_json["_class_name"] = class.into();
    let config = SchedulerConfig::from_json(&config_json)
        .map_err(|e| e.to_string())?
        .config;
    let kind = SchedulerKind::from_class_name(class).ok_or("unknown class")?;
    let mut s =
        build(&config, kind, steps, DdimStepOptions::default()).map_err(|e| e.to_string())?;

    let want_t = floats(&case["timesteps"]);
    let got_t = s.model_timesteps();
    if got_t.len() != want_t.len() || got_t.iter().zip(&want_t).any(|(a, b)| (a - b).abs() > 1e-3) {
        return Err(format!("timesteps {got_t:?}, diffusers {want_t:?}"));
    }
    if let (Some(got), Value::Array(_)) = (s.sigmas(), &case["sigmas"]) {
        let want = floats(&case["sigmas"]);
        let bad = got.len() != want.len()
            || got
                .iter()
                .zip(&want)
                .any(|(a, b)| (a - b).abs() > 1e-5 * (1.0 + b.abs()));
        if bad {
            return Err(format!("sigmas {got:?}, diffusers {want:?}"));
        }
    }
    let sigma = case["init_noise_sigma"].as_f64().unwrap();
    if (s.init_noise_sigma() - sigma).abs() > 1e-5 * sigma {
        return Err(format!(
            "init_noise_sigma {}, diffusers {sigma}",
            s.init_noise_sigma()
        ));
    }

    let mut generator = case["seed"].as_u64().map(Generator::torch);
    let mut samples = Vec::new();
    let mut record = |info: &ddim::pipeline::StepInfo| -> ddim::Result<()> {
        samples.push(info.prev_sample.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    };
    denoise_with(
        &mut model,
        s.as_mut(),
        x_start(),
        generator.as_mut(),
        &mut record,
    )
    .map_err(|e| e.to_string())?;
    if samples.len() != want_t.len() {
        return Err(format!(
            "{} steps, diffusers {}",
            samples.len(),
            want_t.len()
        ));
    }
    // The fixtures keep the samples after the steps listed in `sample_steps`.
    let kept = match &case["sample_steps"] {
        Value::Null => (0..samples.len()).map(|i| i as f64).collect(),
        steps => floats(steps),
    };
    let want = case["samples"].as_array().unwrap();
    for (&i, want) in kept.iter().zip(want) {
        let i = i as usize;
        let got = &samples[i];
        let want = floats(want);
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        if err.is_nan() || err > tol * scale {
            return Err(format!(
                "step {i} of {steps}: max |diff| {err:.3e} (scale {scale:.3}); got {:?}, want {:?}",
                &got[..4],
                &want[..4]
            ));
        }
    }
    Ok(())
}

/// Every case of every fixture file: a list of all mismatches, so one run shows them all.
#[test]
fn samplers_match_diffusers() {
    let mut files: Vec<_> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| !p.ends_with("class_defaults.json"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut count = 0;
    for file in &files {
        let data = ddim::json::parse(&std::fs::read_to_string(file).unwrap()).unwrap();
        let tol = data["tolerance"].as_f64().unwrap_or(1e-4);
        for case in data["cases"].as_array().unwrap() {
            // SAMPLER_PARITY_ONLY=Euler runs the classes whose name contains "Euler".
            if let Ok(only) = std::env::var("SAMPLER_PARITY_ONLY") {
                if !case["class"].as_str().unwrap_or("").contains(only.as_str()) {
                    continue;
                }
            }
            count += 1;
            let tol = case["tolerance"].as_f64().unwrap_or(tol);
            if let Err(e) = check_case(case, tol) {
                failures.push(format!(
                    "{} {} {} steps seed {}: {e}",
                    case["class"], case["config"], case["steps"], case["seed"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
