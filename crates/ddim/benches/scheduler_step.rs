//! Criterion bench of one scheduler step on a (16, 3, 256, 256) float32 CPU tensor: the DDIM step
//! (eta = 0 and eta = 1), the DDPM step, and the same DDIM step through candle tensor operations
//! (the path other devices take), to show what fusing the update into one pass buys.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ddim::rng::TorchGenerator;
use ddim::scheduler::{DDIMScheduler, DDPMScheduler, DdimStepOptions, SchedulerConfig};

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(TorchGenerator::new(seed).randn(n), dims, &Device::Cpu).unwrap()
}

fn bench_step(c: &mut Criterion) {
    let dims = [16, 3, 256, 256];
    let x = randn(1, &dims);
    let eps = randn(2, &dims);
    let z = randn(3, &dims);
    let mut ddim = DDIMScheduler::new(&SchedulerConfig::default()).unwrap();
    ddim.set_timesteps(50).unwrap();
    let mut ddpm = DDPMScheduler::new(&SchedulerConfig::default()).unwrap();
    ddpm.set_timesteps(50).unwrap();
    let t = 500;
    let mut g = c.benchmark_group("scheduler_step");
    g.sample_size(30);
    g.bench_function("ddim_eta0/16x3x256x256/f32/cpu", |b| {
        b.iter(|| {
            ddim.step(&eps, t, &x, &DdimStepOptions::with_eta(0.0), None)
                .unwrap()
        })
    });
    g.bench_function("ddim_eta1/16x3x256x256/f32/cpu", |b| {
        b.iter(|| {
            ddim.step(&eps, t, &x, &DdimStepOptions::with_eta(1.0), Some(&z))
                .unwrap()
        })
    });
    g.bench_function("ddpm_fixed_small/16x3x256x256/f32/cpu", |b| {
        b.iter(|| ddpm.step(&eps, t, &x, Some(&z)).unwrap())
    });
    // The unfused path: same arithmetic as a chain of candle ops (forced by a strided input).
    let xs = x
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    let es = eps
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    g.bench_function("ddim_eta0_candle_ops/16x3x256x256/f32/cpu", |b| {
        b.iter(|| {
            ddim.step(&es, t, &xs, &DdimStepOptions::with_eta(0.0), None)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
