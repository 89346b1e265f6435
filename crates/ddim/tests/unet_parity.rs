//! Parity of `UNet2DModel` with diffusers 0.42.1 on tiny random-weight models. The fixtures
//! (model folders plus `io.safetensors` with `x`, `t`, `class_labels` and diffusers' output) are
//! made by `tools/fixtures/unet_fixtures.py`; see its header for how to regenerate them.

use std::path::PathBuf;

use candle_core::{DType, Device};
use ddim::loader::load_unet;

/// Largest allowed |ours - diffusers| over all output elements.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

/// Loads fixture `name` through the loader, runs it on the stored inputs and returns the largest
/// absolute difference to diffusers' output.
fn max_abs_diff(name: &str) -> f32 {
    let dir = fixture(name);
    let dev = Device::Cpu;
    let unet = load_unet(&dir, DType::F32, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        unet.unknown_config_keys.is_empty(),
        "{name}: {:?}",
        unet.unknown_config_keys
    );
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    let out = unet
        .model
        .forward(&io["x"], &io["t"], io.get("class_labels"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected = &io["out"];
    assert_eq!(out.dims(), expected.dims(), "{name}");
    let diff = (out - expected).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    println!("{name}: max |ddim - diffusers| = {diff:.3e}");
    diff
}

fn check(name: &str) {
    let diff = max_abs_diff(name);
    assert!(
        diff < TOLERANCE,
        "{name}: max abs difference {diff:e} >= {TOLERANCE:e}"
    );
}

/// `.bin` pickle with legacy attention names; one head; [sin, cos], shift 1; downsample padding 0.
#[test]
fn legacy_single_head() {
    check("legacy_single_head");
}

/// Heads of width 2; [cos, sin], shift 0; padding 1; two resnets per block; sharded safetensors.
#[test]
fn multi_head_sharded() {
    check("multi_head_sharded");
}

/// `resnet_time_scale_shift = "scale_shift"` (mid attention without group_norm) + class table.
#[test]
fn scale_shift_class() {
    check("scale_shift_class");
}

/// ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, resnet resampling, no mid-block attention.
#[test]
fn resnet_resample() {
    check("resnet_resample");
}

/// Fourier time embedding (output divided by sigma), no mid block, scalar float timestep, f32 weights.
#[test]
fn fourier_no_mid() {
    check("fourier_no_mid");
}

/// Learned time table, timestep class embedding, centred input, mish, mid scale factor sqrt(2),
/// custom time_embedding_dim and attn_norm_num_groups.
#[test]
fn misc() {
    check("misc");
}

/// f16 weights and activations (the fixture's weights are exact in f16) stay close to
/// diffusers' f32 output: checks the dtype plumbing (time embedding computed in f32 then cast,
/// f32 GroupNorm statistics), not parity. (BF16 is not tried: candle 0.11's CPU matmul has no
/// bf16 kernel.)
#[test]
fn half_precision_runs_close_to_f32() {
    let dir = fixture("multi_head_sharded");
    let dev = Device::Cpu;
    let unet = load_unet(&dir, DType::F16, &dev).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    let out = unet.model.forward(&io["x"], &io["t"], None).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let out = out.to_dtype(DType::F32).unwrap();
    let diff = (out - &io["out"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    println!("multi_head_sharded in f16: max |ddim - diffusers f32| = {diff:.3e}");
    assert!(diff < 1e-2, "f16: {diff}");
}

/// `UNet2DConfig::to_json` writes back exactly what diffusers wrote for every fixture.
#[test]
fn fixture_configs_round_trip_to_diffusers_json() {
    for name in [
        "legacy_single_head",
        "multi_head_sharded",
        "scale_shift_class",
        "resnet_resample",
        "fourier_no_mid",
        "misc",
    ] {
        let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        let (cfg, _) = ddim::unet::UNet2DConfig::from_json_str(&text).unwrap();
        assert_eq!(cfg.to_json(), original, "{name}");
    }
}
