//! `ddim invert`: an image (or x_0 tensor) -> x_T by DDIM inversion; optionally decode it back
//! and report the reconstruction error.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use ddim::image_io;
use ddim::pipeline::{self, SampleOptions};

use crate::common::{self, ComputeArgs, Model, ModelArgs};
use crate::run_record::{self, RunRecord};
use ddim::scheduler::SchedulerKind;

#[derive(Args, Debug)]
pub struct InvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The image to invert (PNG/JPEG, resized to the model's size) or x_0 as an NCHW float32 .npy
    /// in model space.
    #[arg(long, short = 'i', value_name = "IMAGE|x0.npy")]
    pub input: PathBuf,
    /// Inference steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Where to write x_T (NCHW float32 .npy).
    #[arg(long, value_name = "FILE.npy")]
    pub save_tensor: PathBuf,
    /// Decode x_T back with DDIM (eta 0, same steps), write it here and print MSE and PSNR.
    #[arg(long, value_name = "OUT.png")]
    pub reconstruct: Option<PathBuf>,
    /// Overrides the scheduler config's timestep_spacing.
    #[arg(long, value_name = "SPACING")]
    pub timestep_spacing: Option<String>,
    /// The class, for class-conditional models.
    #[arg(long)]
    pub class_label: Option<u32>,
    /// Replace existing output files, whatever made them. Without it, a rerun with the same
    /// settings (recorded in FILE.ddim-run.json beside each output) finds nothing to do, and one
    /// with other settings is refused.
    #[arg(long)]
    pub overwrite: bool,
}

/// `ddim invert`: check the outputs against their records, read x_0, run DDIM inversion to x_T
/// and write it; with `--reconstruct`, decode x_T back and report the error.
pub fn run(args: InvertArgs) -> Result<()> {
    let model = common::open_model(&args.model, args.timestep_spacing.as_deref(), &args.compute)?;
    let outputs: Vec<&std::path::Path> = [Some(&args.save_tensor), args.reconstruct.as_ref()]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
    let record = record_of(&args, &model)?;
    let done = run_record::check_files(&outputs, &record, args.overwrite)?;
    if done.iter().all(|&d| d) {
        run_record::report_nothing_to_do(&outputs);
        return Ok(());
    }
    let x0 = read_input(&args, &model)?;
    let labels = args
        .class_label
        .map(|c| Tensor::new(&[c], &model.device))
        .transpose()?;
    let x_t = model.invert(&x0, args.steps, labels.as_ref(), args.model.quiet)?;
    if !done[0] {
        run_record::write_file_with_record(&args.save_tensor, &record, || {
            Ok(ddim::npy::write_npy_tensor(&args.save_tensor, &x_t)?)
        })?;
        eprintln!("wrote {} ({:?})", args.save_tensor.display(), x_t.dims());
    }
    if let Some(out) = args.reconstruct.as_ref().filter(|_| !done[1]) {
        let x = reconstruct(&args, &model, x_t, labels.as_ref())?;
        if let Some(img) = image_io::to_images(&x)?.first() {
            run_record::write_file_with_record(out, &record, || Ok(image_io::save_png(img, out)?))?;
        }
        let (mse, psnr) = image_error(&x, &x0)?;
        say!(
            "reconstruction: MSE {mse:.6e}, PSNR {psnr:.2} dB ({} steps)",
            args.steps
        );
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// x_0 from `--input`: an image (resized to the model's size) or a model-space `.npy`.
fn read_input(args: &InvertArgs, model: &Model) -> Result<Tensor> {
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    let is_npy = args
        .input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    Ok(if is_npy {
        let t = ddim::npy::read_npy_tensor(&args.input, &model.device)
            .with_context(|| format!("reading --input {}", args.input.display()))?;
        common::check_noise(&t, &shape, &args.input)?;
        t
    } else {
        image_io::load_image(
            &args.input,
            shape[1],
            Some((shape[3] as u32, shape[2] as u32)),
        )?
        .to_device(&model.device)?
    })
}

/// x_T decoded back with DDIM at η = 0 and the same steps.
fn reconstruct(
    args: &InvertArgs,
    model: &Model,
    x_t: Tensor,
    labels: Option<&Tensor>,
) -> Result<Tensor> {
    let bar = common::progress(
        args.steps as u64,
        args.model.quiet,
        "reconstructing",
        "steps",
    );
    let options = SampleOptions {
        num_inference_steps: args.steps,
        ..Default::default()
    };
    // DDIM at η = 0 draws no noise: no generator.
    let mut scheduler = pipeline::scheduler_for(&model.scheduler_config, &options)?;
    let x = pipeline::denoise(
        &model.unet,
        scheduler.as_mut(),
        x_t,
        labels,
        None,
        &mut |_| {
            bar.inc(1);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    Ok(x)
}

/// MSE and PSNR of `x` against `x0` on the [0, 1] image scale, as diffusers' output.
fn image_error(x: &Tensor, x0: &Tensor) -> Result<(f64, f64)> {
    let to01 = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?
            .affine(0.5, 0.5)?
            .clamp(0f32, 1f32)?)
    };
    let mse = (to01(x)? - to01(x0)?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    let psnr = if mse > 0.0 {
        10.0 * (1.0 / mse).log10()
    } else {
        f64::INFINITY
    };
    Ok((mse, psnr))
}

/// The record of an inversion: what decides x_T and its reconstruction. DDIM inversion is
/// deterministic (no η, no noise); the input is identified by its bytes.
fn record_of(args: &InvertArgs, model: &Model) -> Result<RunRecord> {
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    // The DDIM config's keys include the inverse scheduler's, so one set covers both ways.
    let mut r = model.run_record("invert", SchedulerKind::Ddim, &args.compute)?;
    r.set("steps", args.steps)
        .set(
            "input_sha256",
            run_record::sha256_files(std::slice::from_ref(&args.input))?,
        )
        .set("image_shape", shape[1..].to_vec())
        .set("class_label", args.class_label);
    r.note("input", args.input.display().to_string());
    Ok(r)
}
