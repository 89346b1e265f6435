//! The trainer against PyTorch on a whole UNet (down and up blocks with attention, GroupNorm,
//! the time embedding, the middle block): the loss and every parameter's gradient for the
//! epsilon, v_prediction and sample objectives, then two optimisation steps (clipping, AdamW,
//! EMA) with the trainer's defaults, against `torch.optim.AdamW` and diffusers' `EMAModel`.
//! Fixtures: `tools/fixtures/train_fixtures.py` (diffusers 0.42.1, torch 2.15, float32, CPU).
//! Also: the noise schedule the trainer uses is the one its saved `scheduler_config.json` gives.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ddim::scheduler::{DDPMScheduler, PredictionType, SchedulerConfig};
use ddim::train::{Batch, LrSchedule, TrainConfig, Trainer};
use ddim::unet::UNet2DConfig;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train");
/// Largest relative error allowed (f32), per parameter tensor: ‖ours − torch‖ / ‖torch‖.
const TOL: f64 = 1e-4;

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(Path::new(DIR).join("parity.safetensors"), &Device::Cpu)
        .expect("the fixture of tools/fixtures/train_fixtures.py")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn scalar(f: &HashMap<String, Tensor>, key: &str) -> f64 {
    f64::from(flat(&f[key])[0])
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = norm(a.iter().zip(b).map(|(&x, &y)| f64::from(x) - f64::from(y)));
    diff / norm(b.iter().map(|&y| f64::from(y))).max(f64::MIN_POSITIVE)
}

/// The trainer with its defaults (AdamW lr 1e-4, β (0.95, 0.999), weight decay 1e-6, ε 1e-8;
/// clipping at 1; EMA warmup to 0.9999), no warmup, starting from the fixture's weights.
fn trainer(f: &HashMap<String, Tensor>, prediction_type: PredictionType) -> Trainer {
    let (unet, _unknown) = UNet2DConfig::from_file(&Path::new(DIR).join("config.json")).unwrap();
    let mut cfg = TrainConfig::new(unet);
    cfg.scheduler.prediction_type = prediction_type;
    cfg.batch_size = 2;
    cfg.warmup_steps = 0;
    cfg.lr_schedule = LrSchedule::Constant;
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
    let init: HashMap<String, Tensor> = f
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("init/")?.to_string(), v.clone())))
        .collect();
    assert_eq!(init.len(), t.parameter_names().len());
    t.load_weights(&init).unwrap();
    t
}

fn batch(f: &HashMap<String, Tensor>, suffix: &str) -> Batch {
    Batch {
        x0: f[&format!("x0{suffix}")].clone(),
        noise: f[&format!("noise{suffix}")].clone(),
        timesteps: flat(&f[&format!("timesteps{suffix}")])
            .iter()
            .map(|&t| t as usize)
            .collect(),
    }
}

/// The attention's key bias (`to_k.bias`).
fn is_key_bias(name: &str) -> bool {
    name.ends_with("to_k.bias")
}

/// Compares every parameter tensor of `ours` with `f["{prefix}/{name}"]`, less `base` when
/// given (so that small updates are compared, not the weights they move).
fn assert_close(
    f: &HashMap<String, Tensor>,
    names: &[String],
    ours: &[Vec<f32>],
    prefix: &str,
    base: Option<&HashMap<String, Vec<f32>>>,
    tol: f64,
) -> f64 {
    let mut worst = 0f64;
    let mut bad = Vec::new();
    for (name, a) in names.iter().zip(ours) {
        if is_key_bias(name) && base.is_none() {
            // Its exact gradient is 0: softmax is unchanged when a query's scores all shift
            // by q·b_k. Both sides hold only float noise; it must be noise.
            let b = flat(&f[&format!("{prefix}/{name}")]);
            let w = flat(&f[&format!("{prefix}/{}", name.replace("bias", "weight"))]);
            let scale = norm(w.iter().map(|&x| f64::from(x)));
            for (side, v) in [("ours", a), ("torch", &b)] {
                let n = norm(v.iter().map(|&x| f64::from(x)));
                assert!(
                    n <= 1e-5 * scale,
                    "{prefix}/{name} ({side}): {n:e} against {scale:e}"
                );
            }
            continue;
        }
        let mut b = flat(&f[&format!("{prefix}/{name}")]);
        let mut a = a.clone();
        // An update is compared on top of the weights it moved, each of which is rounded to
        // f32 after the update: one unit in the last place of each weight is allowed beyond
        // the tolerance (AdamW's steps here are ~1e-4 against weights ~1, where a float32
        // rounding step is 6e-8; PyTorch and ddim round some of them differently).
        let mut ulps = 0f64;
        if let Some(base) = base {
            for ((x, y), z) in a.iter_mut().zip(&mut b).zip(&base[name]) {
                let ulp = f64::from(f32::from_bits(y.to_bits() + 1) - *y).abs();
                ulps += ulp * ulp;
                *x -= z;
                *y -= z;
            }
        }
        let scale = norm(b.iter().map(|&y| f64::from(y)));
        let e = rel_err(&a, &b);
        let allowed = tol + ulps.sqrt() / scale.max(f64::MIN_POSITIVE);
        if e > allowed {
            bad.push(format!(
                "{prefix}/{name}: relative error {e:.2e} (allowed {allowed:.2e})"
            ));
        }
        worst = worst.max(e);
    }
    assert!(
        bad.is_empty(),
        "{} of {} tensors differ:\n{}",
        bad.len(),
        names.len(),
        bad.join("\n")
    );
    worst
}

#[test]
fn loss_and_every_gradient_match_pytorch_for_each_objective() {
    let f = fixture();
    for (objective, pt) in [
        ("epsilon", PredictionType::Epsilon),
        ("v_prediction", PredictionType::VPrediction),
        ("sample", PredictionType::Sample),
    ] {
        let t = trainer(&f, pt);
        let (loss, grads) = t.loss_and_gradients(&batch(&f, "")).unwrap();
        let want = scalar(&f, &format!("loss/{objective}"));
        let e = (f64::from(loss) - want).abs() / want;
        eprintln!("{objective}: loss {loss} against {want}");
        assert!(e <= TOL, "{objective}: loss {loss} against {want}");
        let names = t.parameter_names().to_vec();
        assert_eq!(grads.len(), names.len());
        let worst = assert_close(&f, &names, &grads, &format!("grad/{objective}"), None, TOL);
        eprintln!("{objective}: loss {loss} (torch {want}), worst gradient error {worst:.2e}");
    }
}

fn as_map(m: HashMap<String, Tensor>) -> HashMap<String, Vec<f32>> {
    m.into_iter().map(|(k, v)| (k, flat(&v))).collect()
}

fn ordered(names: &[String], m: &HashMap<String, Vec<f32>>) -> Vec<Vec<f32>> {
    names.iter().map(|n| m[n].clone()).collect()
}

/// Checks the weights and EMA weights after the fixture's second step: what the two updates
/// moved each weight (p_2 - p_0) and the EMA's distance from p_0 (the EMA decay is 0 at the
/// first step and 1 - 2^-0.75 at the second). Weights for which `skip` holds are left out.
fn assert_after_two_steps(
    f: &HashMap<String, Tensor>,
    t: &Trainer,
    init: &HashMap<String, Vec<f32>>,
    tol: f64,
    skip: fn(&str) -> bool,
) {
    let names: Vec<String> = t
        .parameter_names()
        .iter()
        .filter(|n| !skip(n))
        .cloned()
        .collect();
    let params = ordered(&names, &as_map(t.weights().unwrap()));
    let p = assert_close(f, &names, &params, "step2/param", Some(init), tol);
    let ema = ordered(&names, &as_map(t.ema_tensors().unwrap()));
    let e = assert_close(f, &names, &ema, "step2/ema", Some(init), tol);
    eprintln!("worst update error {p:.2e}, EMA {e:.2e}");
}

fn assert_step_stats(f: &HashMap<String, Tensor>, k: usize, stats: &ddim::train::StepStats) {
    let loss = scalar(f, &format!("step{k}/loss"));
    assert!(
        (f64::from(stats.loss) - loss).abs() / loss <= TOL,
        "step {k}"
    );
    let grad_norm = scalar(f, &format!("step{k}/grad_norm"));
    assert!(
        (stats.grad_norm - grad_norm).abs() / grad_norm <= TOL,
        "step {k}: gradient norm {} against {grad_norm}",
        stats.grad_norm
    );
    // clipping is active: the test covers it
    assert!(grad_norm > 1.0, "{grad_norm}");
}

#[test]
fn clipping_adamw_and_ema_match_pytorch_on_its_gradients() {
    // The optimiser alone: PyTorch's gradients of both steps go in, so both sides update from
    // the same numbers and only the update's own arithmetic can differ.
    let f = fixture();
    let mut t = trainer(&f, PredictionType::Epsilon);
    let names = t.parameter_names().to_vec();
    let init = as_map(t.weights().unwrap());
    for (k, prefix) in [(1, "grad/epsilon"), (2, "step2/grad")] {
        let grads: Vec<Vec<f32>> = names
            .iter()
            .map(|n| flat(&f[&format!("{prefix}/{n}")]))
            .collect();
        let loss = scalar(&f, &format!("step{k}/loss")) as f32;
        let stats = t.apply_gradients(loss, &grads).unwrap();
        assert_step_stats(&f, k, &stats);
    }
    assert_after_two_steps(&f, &t, &init, TOL, |_| false);
}

#[test]
fn two_whole_training_steps_match_pytorch() {
    // Gradients, clipping, AdamW and EMA together. The key bias is left out: its exact
    // gradient is 0 (checked above), and AdamW, which divides each weight's step by that
    // weight's own gradient scale, turns either side's float noise into steps of the full
    // learning rate in arbitrary directions.
    let f = fixture();
    let mut t = trainer(&f, PredictionType::Epsilon);
    let init = as_map(t.weights().unwrap());
    for (k, suffix) in [(1, ""), (2, "_2")] {
        let stats = t.step_on(&batch(&f, suffix)).unwrap();
        assert_step_stats(&f, k, &stats);
    }
    assert_after_two_steps(&f, &t, &init, TOL, is_key_bias);
}

#[test]
fn the_noise_schedule_trained_on_is_the_one_saved() {
    // A mismatch between the schedule the trainer noises with and the scheduler_config.json it
    // saves would make every sampler denoise the wrong noise levels.
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    for (pt, schedule) in [
        (PredictionType::Epsilon, "linear"),
        (PredictionType::VPrediction, "squaredcos_cap_v2"),
    ] {
        let mut t = trainer(&f, PredictionType::Epsilon);
        let mut cfg = t.config().clone();
        cfg.scheduler.prediction_type = pt;
        cfg.scheduler.beta_schedule = ddim::schedule::BetaSchedule::from_name(schedule).unwrap();
        cfg.scheduler.num_train_timesteps = 500;
        t = Trainer::new(cfg, &Device::Cpu).unwrap();
        let b = Batch {
            timesteps: vec![499, 3],
            ..batch(&f, "")
        };
        t.step_on(&b).unwrap();
        let out = dir.path().join(schedule);
        ddim::train::save_pipeline(&t, &out).unwrap();
        let saved = SchedulerConfig::from_file(out.join("scheduler").join("scheduler_config.json"))
            .unwrap()
            .config;
        assert_eq!(saved.prediction_type, pt);
        assert_eq!(saved.num_train_timesteps, 500);
        let used = t.noise_scheduler();
        let loaded = DDPMScheduler::new(&saved).unwrap();
        assert_eq!(used.alphas_cumprod(), loaded.alphas_cumprod());
        assert_eq!(used.betas(), loaded.betas());
        assert_eq!(used.alphas_cumprod().len(), 500);
        assert_eq!(used.config().prediction_type, pt);
    }
}
