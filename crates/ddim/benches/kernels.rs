//! Criterion benches of the CPU kernels in `ddim::ops` against candle's own ops and against the
//! `gemm` crate on the equivalent matrix product, at the shapes of the google/ddpm-cifar10-32
//! UNet, plus whole UNet forward passes of that architecture (random weights) at batch 1 and 16.
//!
//! `cargo bench -p ddim --bench kernels` (RAYON_NUM_THREADS sets the thread count). Throughput
//! is reported in FLOP/s ("elem/s"): 2·c_out·c_in·kh·kw·ho·wo per image for a convolution, the
//! same count for the matrix product of equal size. Run it on a quiet machine.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ddim::ops::winograd::Tile;
use ddim::rng::TorchGenerator;
use ddim::unet::{UNet2DConfig, UNet2DModel};

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(TorchGenerator::new(seed).randn(n), dims, &Device::Cpu).unwrap()
}

fn conv(c: &mut Criterion) {
    ddim::configure_cpu_threads();
    // (batch, c_in, size, c_out): the UNet's 3×3 convolutions at each level
    let shapes = [
        (16, 128, 32, 128),
        (16, 256, 16, 256),
        (16, 256, 8, 256),
        (16, 256, 4, 256),
        (1, 128, 32, 128),
        (1, 256, 16, 256),
        (1, 256, 8, 256),
        (1, 256, 4, 256),
    ];
    let mut g = c.benchmark_group("conv2d_3x3");
    g.sample_size(10);
    for (b, ci, s, co) in shapes {
        let x = randn(1, &[b, ci, s, s]);
        let w = randn(2, &[co, ci, 3, 3]);
        let k = ci * 9;
        let flops = 2 * co * k * s * s * b;
        g.throughput(Throughput::Elements(flops as u64));
        let id = format!("{b}x{ci}x{s}x{s}->{co}");
        g.bench_function(BenchmarkId::new("ddim", &id), |bn| {
            bn.iter(|| ddim::ops::conv2d(&x, &w, 1, 1).unwrap())
        });
        for (name, tile) in [("ddim-winograd", Tile::F2), ("ddim-winograd-f4", Tile::F4)] {
            let u = ddim::ops::winograd::transform_weight(&w, tile).unwrap();
            g.bench_function(BenchmarkId::new(name, &id), |bn| {
                bn.iter(|| ddim::ops::conv::winograd_conv3x3(&x, &u, &w, 1).unwrap())
            });
        }
        g.bench_function(BenchmarkId::new("candle", &id), |bn| {
            bn.iter(|| x.conv2d(&w, 1, 1, 1, 1).unwrap())
        });
        // The matrix product a convolution amounts to, (co × k)·(k × b·s²), by candle's matmul
        // (the gemm crate): the throughput the convolution's own GEMMs could reach.
        let a = randn(3, &[co, k]);
        let bm = randn(4, &[k, b * s * s]);
        g.bench_function(BenchmarkId::new("gemm-equivalent", &id), |bn| {
            bn.iter(|| a.matmul(&bm).unwrap())
        });
    }
    g.finish();
}

/// One thread's matrix product at the shapes of the Winograd convolutions' per-point products,
/// `(c_out × c_in)·(c_in × blocks)`: the bf16 kernel (where the CPU has AVX512-BF16) against
/// the `gemm` crate in f32.
fn product_bf16(c: &mut Criterion) {
    if !ddim::ops::bf16::available() {
        eprintln!("product_bf16: this CPU has no AVX512-BF16, skipped");
        return;
    }
    let mut g = c.benchmark_group("product_1_thread");
    for (m, k, n) in [
        (128, 128, 64),
        (256, 256, 64),
        (256, 512, 128),
        (128, 384, 256),
    ] {
        let a = TorchGenerator::new(1).randn(m * k);
        let b = TorchGenerator::new(2).randn(k * n);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let id = format!("{m}x{k}x{n}");
        let packed = ddim::ops::bf16::pack_a(&a, m, k);
        g.bench_function(BenchmarkId::new("bf16", &id), |bn| {
            bn.iter(|| ddim::ops::bf16::matmul(&packed, m, k, &b, n, n, &mut out, n))
        });
        g.bench_function(BenchmarkId::new("gemm-f32", &id), |bn| {
            bn.iter(|| unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            })
        });
    }
    g.finish();
}

fn group_norm_silu(c: &mut Criterion) {
    ddim::configure_cpu_threads();
    let mut g = c.benchmark_group("group_norm_silu");
    g.sample_size(20);
    for (b, ch, s) in [(16, 128, 32), (16, 256, 8), (1, 128, 32)] {
        let x = randn(5, &[b, ch, s, s]);
        let gamma = randn(6, &[ch]);
        let beta = randn(7, &[ch]);
        let id = format!("{b}x{ch}x{s}x{s}");
        g.throughput(Throughput::Elements((b * ch * s * s) as u64));
        g.bench_function(BenchmarkId::new("ddim", &id), |bn| {
            bn.iter(|| ddim::ops::group_norm_silu(&x, &gamma, &beta, 32, 1e-5).unwrap())
        });
        let m = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), ch, 32, 1e-5).unwrap();
        g.bench_function(BenchmarkId::new("candle", &id), |bn| {
            bn.iter(|| candle_nn::ops::silu(&m.forward(&x).unwrap()).unwrap())
        });
    }
    g.finish();
}

fn unet_forward(c: &mut Criterion) {
    ddim::configure_cpu_threads();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hub-configs/google--ddpm-cifar10-32/config.json"
    );
    let (cfg, _) = UNet2DConfig::from_file(std::path::Path::new(path)).unwrap();
    // Random weights from the training initialisation, then held as plain tensors, as a
    // loaded model holds them: training variables would keep Conv2d on im2col (no Winograd).
    let vars = VarMap::new();
    UNet2DModel::new(
        &cfg,
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let weights: std::collections::HashMap<String, Tensor> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    assert!(weights.values().all(|w| !w.is_variable()));
    let mut g = c.benchmark_group("unet_forward");
    g.sample_size(10);
    for b in [1usize, 16] {
        // A model per batch size: each convolution picks its Winograd tile at its first
        // forward pass, by the batch it sees, and keeps it.
        let unet = UNet2DModel::new(
            &cfg,
            VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = randn(8, &[b, 3, 32, 32]);
        let t = Tensor::new(500f32, &Device::Cpu).unwrap();
        // images per second
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(BenchmarkId::new("cifar10-32", format!("batch{b}")), |bn| {
            bn.iter(|| unet.forward(&x, &t, None).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, conv, product_bf16, group_norm_silu, unet_forward);
criterion_main!(benches);
