//! Times whole training steps (noise, add_noise, UNet forward, MSE, backward, clipping, AdamW,
//! EMA) of a preset on a built-in data set, for `tools/bench_train_vs_diffusers.py`:
//!
//! `cargo run --release -p ddim --example train_bench -- [preset] [data] [batch] [steps] [config_out.json]`
//!
//! Prints one JSON line: the preset, batch, parameter count and the median step time after two
//! warm-up steps; writes the UNet config (diffusers' `config.json`) to `config_out.json` if given,
//! so diffusers can build the same model.
use std::time::Instant;

use candle_core::Device;
use ddim::train::{self, Dataset, Fit, TrainConfig, Trainer};

fn main() -> ddim::Result<()> {
    ddim::configure_cpu_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let preset = arg(0, "small");
    let data_name = arg(1, "mnist5k");
    let batch: usize = arg(2, "32").parse().expect("batch");
    let steps: usize = arg(3, "10").parse().expect("steps");
    let data = Dataset::builtin(&data_name, None, Fit::Crop)?;
    let (c, h) = (data.channels, data.size);
    let mut config = TrainConfig::new(train::preset(&preset, c, h)?);
    config.batch_size = batch;
    if let Some(path) = args.get(4) {
        let json = serde_json::to_string_pretty(&config.unet.to_json()).expect("json");
        std::fs::write(path, json).expect("writing the config");
    }
    let mut trainer = Trainer::new(config, &Device::Cpu)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        trainer.step(&data)?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "ddim",
            "preset": preset,
            "data": data_name,
            "batch": batch,
            "image": [c, h, h],
            "parameters": trainer.num_parameters(),
            "steps_timed": steps,
            "median_step_s": median,
            "images_per_s": batch as f64 / median,
        })
    );
    Ok(())
}
