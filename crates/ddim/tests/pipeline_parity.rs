//! Full sampling and inversion through `ddim::pipeline` on a diffusers folder saved by
//! `DDPMPipeline.save_pretrained`, against diffusers' samples from the same
//! `torch.Generator().manual_seed(seed)` (fixtures from tools/fixtures/pipeline_fixtures.py).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ddim::loader::load_unet;
use ddim::pipeline::{
    interpolation_noise, invert, no_callback, noise_shape, sample, Generator, SampleOptions,
};
use ddim::scheduler::{SchedulerConfig, SchedulerKind};
use serde_json::Value;

fn fixture_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pipeline")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(format!("{}/expected.json", fixture_dir())).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &[f32]) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn sampling_matches_diffusers_with_torch_generator() {
    let model = Path::new(fixture_dir()).join("tiny-ddpm");
    let unet = load_unet(&model, DType::F32, &Device::Cpu).unwrap();
    let folder_config = SchedulerConfig::from_file(unet.scheduler_config().unwrap())
        .unwrap()
        .config;
    let mut worst = 0f32;
    for case in expected()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let config = SchedulerConfig::from_json(&case["scheduler_config"])
            .unwrap()
            .config;
        if name == "ddim-default" || name.starts_with("ddpm") {
            // the folder's own scheduler config is the one these cases use
            assert_eq!(
                config,
                SchedulerConfig {
                    class_name: None,
                    ..folder_config.clone()
                }
            );
        }
        let options = SampleOptions {
            sampler: match case["sampler"].as_str().unwrap() {
                "ddim" => SchedulerKind::Ddim,
                _ => SchedulerKind::Ddpm,
            },
            num_inference_steps: case["steps"].as_u64().unwrap() as usize,
            eta: case["eta"].as_f64().unwrap(),
            ..Default::default()
        };
        let n = case["n"].as_u64().unwrap() as usize;
        let mut g = Generator::torch(case["seed"].as_u64().unwrap());
        let x_t = g
            .randn(&noise_shape(&unet.model, n).unwrap(), &Device::Cpu)
            .unwrap();
        let mut steps = 0;
        let x0 = sample(&unet.model, &config, &options, x_t, &mut g, &mut |_| {
            steps += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(steps, options.num_inference_steps, "{name}");
        let d = max_abs_diff(&x0, &f32s(&case["final"]));
        assert!(d < 1e-3, "{name} ({}): max |Δ| = {d}", case["source"]);
        worst = worst.max(d);
    }
    eprintln!("largest difference from diffusers over all sampling cases: {worst:e}");
}

#[test]
fn inversion_matches_diffusers() {
    let model = Path::new(fixture_dir()).join("tiny-ddpm");
    let unet = load_unet(&model, DType::F32, &Device::Cpu).unwrap();
    let inv = &expected()["inversion"];
    let config = SchedulerConfig {
        clip_sample: false,
        ..SchedulerConfig::from_file(unet.scheduler_config().unwrap())
            .unwrap()
            .config
    };
    let x0 = Tensor::from_vec(f32s(&inv["x0"]), (1, 3, 8, 8), &Device::Cpu).unwrap();
    let x_t = invert(
        &unet.model,
        &config,
        &x0,
        inv["steps"].as_u64().unwrap() as usize,
        None,
        &mut no_callback,
    )
    .unwrap();
    let d = max_abs_diff(&x_t, &f32s(&inv["x_t"]));
    assert!(d < 1e-3, "inversion: max |Δ| = {d}");
}

#[test]
fn per_image_noise_does_not_depend_on_the_batch() {
    // Image 3 of a run is the same whether it is drawn in a batch of 4 or alone.
    let shape = [4, 3, 8, 8];
    let all = Generator::per_image(42, 0, 4)
        .randn(&shape, &Device::Cpu)
        .unwrap();
    let alone = Generator::per_image(42, 3, 1)
        .randn(&[1, 3, 8, 8], &Device::Cpu)
        .unwrap();
    let d = (all.narrow(0, 3, 1).unwrap() - alone)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    assert!(Generator::per_image(42, 0, 2)
        .randn(&shape, &Device::Cpu)
        .is_err());
}

#[test]
fn interpolation_keeps_the_ends_and_the_norm() {
    let mut g = Generator::torch(0);
    let a = g.randn(&[1, 3, 8, 8], &Device::Cpu).unwrap();
    let b = g.randn(&[1, 3, 8, 8], &Device::Cpu).unwrap();
    let z = interpolation_noise(&a, &b, 5).unwrap();
    assert_eq!(z.dims(), &[5, 3, 8, 8]);
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    let first = z.narrow(0, 0, 1).unwrap();
    let last = z.narrow(0, 4, 1).unwrap();
    assert!(norm(&(first - &a).unwrap()) < 1e-4);
    assert!(norm(&(last - &b).unwrap()) < 1e-4);
    // slerp between two vectors of similar norm stays near that norm (linear interpolation would shrink it)
    let mid = z.narrow(0, 2, 1).unwrap();
    let (na, nb, nm) = (norm(&a), norm(&b), norm(&mid));
    assert!(nm > 0.95 * na.min(nb), "{nm} vs {na}, {nb}");
    assert!(interpolation_noise(&a, &b, 1).is_err());
}

/// The one loop's contract with a scheduler: a step that adds noise without a generator is an
/// error naming the step; a deterministic run needs none and calls the scheduler once per
/// timestep with the indices in order.
#[test]
fn the_loop_drives_any_scheduler_by_index() {
    use ddim::pipeline::denoise;
    use ddim::scheduler::{DDIMScheduler, DdimSampler, DdimStepOptions, Scheduler, StepOutput};

    let model = Path::new(fixture_dir()).join("tiny-ddpm");
    let unet = load_unet(&model, DType::F32, &Device::Cpu).unwrap();
    let config = SchedulerConfig::from_file(unet.scheduler_config().unwrap())
        .unwrap()
        .config;
    let x_t = Generator::per_image(1, 0, 1)
        .randn(&noise_shape(&unet.model, 1).unwrap(), &Device::Cpu)
        .unwrap();
    let mut ddim = DDIMScheduler::new(&config).unwrap();
    ddim.set_timesteps(4).unwrap();
    let mut noisy = DdimSampler {
        scheduler: ddim.clone(),
        options: DdimStepOptions::with_eta(1.0),
    };
    let err = denoise(
        &unet.model,
        &mut noisy,
        x_t.clone(),
        None,
        None,
        &mut no_callback,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("generator") && err.contains("step 0"), "{err}");

    /// DDIM at η = 0, recording the indices it is stepped with.
    struct Recording(DdimSampler, Vec<usize>);
    impl Scheduler for Recording {
        fn model_timesteps(&self) -> Vec<f64> {
            self.0.model_timesteps()
        }
        fn needs_noise(&self, index: usize) -> bool {
            self.0.needs_noise(index)
        }
        fn step(
            &mut self,
            out: &Tensor,
            index: usize,
            x: &Tensor,
            noise: Option<&Tensor>,
        ) -> ddim::Result<StepOutput> {
            self.1.push(index);
            self.0.step(out, index, x, noise)
        }
    }
    let mut recording = Recording(
        DdimSampler {
            scheduler: ddim.clone(),
            options: DdimStepOptions::default(),
        },
        Vec::new(),
    );
    let a = denoise(
        &unet.model,
        &mut recording,
        x_t.clone(),
        None,
        None,
        &mut no_callback,
    )
    .unwrap();
    assert_eq!(recording.1, [0, 1, 2, 3]);
    // the same as sample() with DDIM options
    let b = sample(
        &unet.model,
        &config,
        &SampleOptions {
            num_inference_steps: 4,
            ..Default::default()
        },
        x_t,
        &mut Generator::per_image(0, 0, 1),
        &mut no_callback,
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&a, &b.flatten_all().unwrap().to_vec1().unwrap()),
        0.0
    );
}
