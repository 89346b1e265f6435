//! RePaint (`pipeline::repaint`): diffusers' jump schedule, the kept region exact, bad options.

use candle_core::{DType, Device, Tensor};
use ddim::loader::load_unet;
use ddim::pipeline::{self, Generator, RepaintOptions};
use ddim::scheduler::SchedulerConfig;

fn opts(n: usize, jump_length: usize, jump_n_sample: usize) -> RepaintOptions {
    RepaintOptions {
        num_inference_steps: n,
        jump_length,
        jump_n_sample,
        eta: 0.0,
    }
}

#[test]
fn the_walk_is_diffusers_jump_schedule() {
    // RePaintScheduler.set_timesteps(10, jump_length=3, jump_n_sample=2), T = 1000
    assert_eq!(
        pipeline::repaint_timesteps(&opts(10, 3, 2), 1000).unwrap(),
        [
            900, 800, 700, 600, 700, 800, 900, 800, 700, 600, 500, 400, 300, 400, 500, 600, 500,
            400, 300, 200, 100, 0, 100, 200, 300, 200, 100, 0
        ]
    );
    // no resampling: straight down
    assert_eq!(
        pipeline::repaint_timesteps(&opts(5, 2, 1), 1000).unwrap(),
        [800, 600, 400, 200, 0]
    );
    // diffusers' default walk: 250 steps, jumps of 10, 10 samples
    assert_eq!(
        pipeline::repaint_timesteps(&RepaintOptions::default(), 1000)
            .unwrap()
            .len(),
        4570
    );
    for bad in [
        opts(0, 1, 1),
        opts(2000, 1, 1),
        opts(10, 0, 1),
        opts(10, 1, 0),
    ] {
        assert!(pipeline::repaint_timesteps(&bad, 1000).is_err(), "{bad:?}");
    }
}

#[test]
fn the_kept_region_is_the_image_and_the_rest_is_repainted() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline/tiny-ddpm");
    let unet = load_unet(&dir, DType::F32, &Device::Cpu).unwrap();
    let config = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))
        .unwrap()
        .config;
    let v: Vec<f32> = (0..2 * 3 * 8 * 8)
        .map(|i| ((i * 37 % 200) as f32 / 100.0) - 1.0)
        .collect();
    let image = Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap();
    // keep the left half
    let m: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(m, (1, 1, 8, 8), &Device::Cpu).unwrap();
    let mut calls = 0;
    let x = pipeline::repaint(
        &unet.model,
        &config,
        &opts(10, 3, 2),
        &image,
        &mask,
        &mut Generator::per_image(3, 0, 2),
        &mut |_, n| {
            assert_eq!(n, 28);
            calls += 1;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(calls, 28);
    let got = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut repainted = 0.0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if i % 8 < 4 {
            assert_eq!(g, w, "kept value {i} changed");
        } else {
            repainted += (g - w).abs();
        }
    }
    assert!(repainted > 1.0, "the masked half was not repainted");
}
