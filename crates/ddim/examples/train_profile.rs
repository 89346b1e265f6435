//! Times the phases of a training step (forward, backward, optimiser) on the `small` preset:
//! `cargo run --release -p ddim --example train_profile -- [batch] [size]`.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddim::unet::UNet2DModel;

fn main() -> ddim::Result<()> {
    ddim::configure_cpu_threads();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (b, size) = (
        args.first().copied().unwrap_or(32),
        args.get(1).copied().unwrap_or(28),
    );
    if std::env::var("MICRO").is_ok() {
        micro()?;
        return Ok(());
    }
    let cfg = ddim::train::preset("small", 1, size)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = UNet2DModel::new(&cfg, vb)?;
    let x = Tensor::randn(0f32, 1.0, (b, 1, size, size), &Device::Cpu)?;
    let t = Tensor::arange(0u32, b as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
    for i in 0..4 {
        let t0 = Instant::now();
        let y = model.forward(&x, &t, None)?;
        let loss = y.sqr()?.mean_all()?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        drop(grads);
        let t3 = Instant::now();
        println!(
            "iter {i}: forward {:.0} ms, backward {:.0} ms, drop {:.0} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3
        );
    }
    Ok(())
}

#[allow(dead_code)]
pub fn micro() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (32, 32, 28, 28), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (32, 32, 3, 3), &dev)?;
    let g = Tensor::ones(32, DType::F32, &dev)?;
    let b = Tensor::zeros(32, DType::F32, &dev)?;
    let time =
        |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<()> {
            f()?;
            let t = Instant::now();
            for _ in 0..5 {
                f()?;
            }
            println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 200.0);
            Ok(())
        };
    time("conv3x3 ours", &|| ddim::ops::conv2d(&x, &w, 1, 1))?;
    time("conv3x3 candle", &|| x.conv2d(&w, 1, 1, 1, 1))?;
    time("group_norm ours", &|| {
        ddim::ops::group_norm(&x, &g, &b, 32, 1e-5)
    })?;
    time("silu ours", &|| ddim::ops::silu(&x))?;
    time("add", &|| &x + &x)?;
    time("broadcast_add bias", &|| {
        x.broadcast_add(&g.reshape((1, 32, 1, 1))?)
    })?;
    time("cat", &|| Tensor::cat(&[&x, &x], 1))?;
    Ok(())
}
