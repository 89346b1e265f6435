//! The CPU inference kernels against the training path, end to end, on the built-in MNIST
//! model: loaded weights (constants) run the Winograd convolutions, F(4×4, 3×3) at the 28×28
//! level and F(2×2, 3×3) at 14×14; the same weights as training variables run im2col + GEMM.
//! The op-level parity with candle's own kernels is in `ddim::ops`' unit tests.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddim::unet::UNet2DModel;

#[test]
fn winograd_unet_matches_the_im2col_unet() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ddim-cli/assets/default-model");
    let dev = Device::Cpu;
    let loaded = ddim::loader::load_unet(&dir, DType::F32, &dev).unwrap();
    let varmap = VarMap::new();
    let trainable = UNet2DModel::new(
        &loaded.config,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    // the shipped weights are f16; the loaded model holds them as f32, and so do the variables
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let weights = candle_core::safetensors::load(file, &dev).unwrap();
    let vars = varmap.data().lock().unwrap();
    assert_eq!(vars.len(), weights.len());
    for (name, var) in vars.iter() {
        var.set(&weights[name].to_dtype(DType::F32).unwrap())
            .unwrap();
    }
    drop(vars);

    let x = Tensor::randn(0f32, 1.0, (4, 1, 28, 28), &dev).unwrap();
    for step in [999i64, 500, 20] {
        let t = Tensor::new(&[step; 4], &dev).unwrap();
        let fast = loaded.model.forward(&x, &t, None).unwrap();
        let plain = trainable.forward(&x, &t, None).unwrap();
        let scale = plain.abs().unwrap().max_all().unwrap();
        let err = (&fast - &plain).unwrap().abs().unwrap().max_all().unwrap();
        let rel = err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
        eprintln!("t = {step}: largest difference {rel:e} of the largest output");
        assert!(rel < 1e-5, "t = {step}: {rel:e}");
    }
}

/// `UNet2DModel::prepare` makes the same Winograd transforms, convolution by convolution, as a
/// first forward pass would: F(4×4) and F(2×2) at batch 4, and im2col at batch 1 where the
/// images have too few blocks for two threads.
#[test]
fn prepare_makes_what_the_first_forward_pass_would() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ddim-cli/assets/default-model");
    let dev = Device::Cpu;
    // the choice depends on the number of threads: two, as on the machines the rule was tuned on
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for batch in [4, 1] {
        let prepared = ddim::loader::load_unet(&dir, DType::F32, &dev)
            .unwrap()
            .model;
        let lazy = ddim::loader::load_unet(&dir, DType::F32, &dev)
            .unwrap()
            .model;
        let x = Tensor::zeros((batch, 1, 28, 28), DType::F32, &dev).unwrap();
        let t = Tensor::new(&vec![500i64; batch][..], &dev).unwrap();
        pool.install(|| {
            prepared.prepare(batch, 28, 28);
            lazy.forward(&x, &t, None).unwrap();
        });
        let points = lazy.winograd_points();
        assert_eq!(prepared.winograd_points(), points, "batch {batch}");
        if batch == 4 {
            assert!(
                points.contains(&Some(36)) && points.contains(&Some(16)),
                "{points:?}"
            );
        }
        assert!(points.contains(&None), "{points:?}");
    }
}
