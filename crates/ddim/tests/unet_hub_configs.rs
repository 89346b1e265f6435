//! The unet configs of the google/ddpm-* hub models (as saved by diffusers 0.42.1) parse, build
//! with random weights, have the published parameter counts and run one forward pass.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddim::unet::{UNet2DConfig, UNet2DModel};

fn config(name: &str) -> UNet2DConfig {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hub-configs")
        .join(name)
        .join("config.json");
    let (cfg, unknown) = UNet2DConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(unknown.is_empty(), "{name}: unknown keys {unknown:?}");
    cfg
}

/// Builds `name` with random weights, checks its parameter count (diffusers:
/// `sum(p.numel() for p in UNet2DModel.from_config(config).parameters())`) and runs one forward
/// at batch 1 on a `size` x `size` input.
fn check(name: &str, parameters: usize, size: usize) {
    let cfg = config(name);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let unet = UNet2DModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let count: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(count, parameters, "{name}");

    let x = Tensor::randn(0f32, 1., (1, 3, size, size), &dev).unwrap();
    let t = Tensor::new(&[500i64], &dev).unwrap();
    let out = unet
        .forward(&x, &t, None)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(out.dims(), &[1, 3, size, size], "{name}");
    let finite = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        finite.iter().all(|v| v.is_finite()),
        "{name}: non-finite output"
    );
}

#[test]
fn ddpm_cifar10_32() {
    check("google--ddpm-cifar10-32", 35_746_307, 32);
}

// The 256x256 models have five downsamplers, so 32x32 is the smallest input (1x1 at the bottom);
// it keeps the test fast and exercises every layer.
#[test]
fn ddpm_celebahq_256() {
    check("google--ddpm-celebahq-256", 113_673_219, 32);
}

#[test]
fn ddpm_church_256() {
    check("google--ddpm-church-256", 113_673_219, 32);
}

#[test]
fn ddpm_ema_bedroom_256() {
    check("google--ddpm-ema-bedroom-256", 113_673_219, 32);
}

/// `to_json` writes back exactly what diffusers 0.42.1 wrote, for every hub config.
#[test]
fn configs_round_trip_to_diffusers_json() {
    for name in [
        "google--ddpm-cifar10-32",
        "google--ddpm-celebahq-256",
        "google--ddpm-church-256",
        "google--ddpm-ema-bedroom-256",
    ] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hub-configs")
            .join(name)
            .join("config.json");
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(config(name).to_json(), original, "{name}");
    }
}
