//! SDEdit (`pipeline::sdedit`): the steps it runs are diffusers' img2img choice, it starts from
//! the image noised by the DDPM forward process, and a small strength keeps the image.

use candle_core::{DType, Device, Tensor};
use ddim::loader::load_unet;
use ddim::pipeline::{self, Generator, SampleOptions};
use ddim::scheduler::{SchedulerConfig, SchedulerKind};

fn tiny() -> (ddim::loader::LoadedUNet, SchedulerConfig) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline/tiny-ddpm");
    let unet = load_unet(&dir, DType::F32, &Device::Cpu).unwrap();
    let config = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))
        .unwrap()
        .config;
    (unet, config)
}

fn init_image() -> Tensor {
    let v: Vec<f32> = (0..3 * 8 * 8)
        .map(|i| ((i * 37 % 200) as f32 / 100.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (1, 3, 8, 8), &Device::Cpu).unwrap()
}

fn run(strength: f64, steps: usize, sampler: SchedulerKind) -> ddim::Result<(Tensor, Vec<f64>)> {
    let (unet, config) = tiny();
    let options = SampleOptions {
        sampler,
        num_inference_steps: steps,
        ..SampleOptions::default()
    };
    let mut seen = Vec::new();
    let x = pipeline::sdedit(
        &unet.model,
        &config,
        &options,
        &init_image(),
        strength,
        &mut Generator::per_image(7, 0, 1),
        &mut |s| {
            seen.push(s.timestep);
            Ok(())
        },
    )?;
    Ok((x, seen))
}

#[test]
fn sdedit_runs_the_last_steps_diffusers_img2img_runs() {
    // 10 DDIM steps (leading): 900, 800, ..., 0; strength 0.55 runs int(5.5) = 5 of them
    let (_, seen) = run(0.55, 10, SchedulerKind::Ddim).unwrap();
    assert_eq!(seen, [400.0, 300.0, 200.0, 100.0, 0.0]);
    let (_, seen) = run(1.0, 10, SchedulerKind::Ddim).unwrap();
    assert_eq!(seen.len(), 10);
    assert_eq!(seen[0], 900.0);
    // DDPM at 20 steps, strength 0.5: the last 10
    let (_, seen) = run(0.5, 20, SchedulerKind::Ddpm).unwrap();
    assert_eq!(seen.len(), 10);
    assert_eq!(seen.last(), Some(&0.0));
}

#[test]
fn a_small_strength_keeps_the_image() {
    // one step from t = 0: the image plus 1% noise, denoised once
    let (x, seen) = run(0.02, 50, SchedulerKind::Ddim).unwrap();
    assert_eq!(seen, [0.0]);
    let diff = (x - init_image())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 0.1, "moved {diff}");
    // a larger strength moves it further
    let (y, _) = run(0.9, 50, SchedulerKind::Ddim).unwrap();
    let moved = (y - init_image())
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > diff / 4.0, "{moved} against {diff}");
}

#[test]
fn bad_strengths_and_samplers_are_errors() {
    for s in [0.0, -0.5, 1.5, f64::NAN] {
        let e = run(s, 10, SchedulerKind::Ddim).unwrap_err().to_string();
        assert!(e.contains("strength"), "{s}: {e}");
    }
    // 10 steps × 0.05 < 1 step
    let e = run(0.05, 10, SchedulerKind::Ddim).unwrap_err().to_string();
    assert!(e.contains("at least one step"), "{e}");
    let e = run(0.5, 10, SchedulerKind::EulerDiscrete)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DDIMScheduler or DDPMScheduler"), "{e}");
}
