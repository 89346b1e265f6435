//! `ddim inpaint`: RePaint (Lugmayr et al. 2022) as diffusers' `RePaintPipeline` runs it: the
//! image kept where the mask is white, the rest repainted by the model, with jumps back up the
//! schedule (resampling) so that the two parts agree.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use ddim::image_io;
use ddim::pipeline::{self, Generator, RepaintOptions};
use ddim::scheduler::SchedulerKind;

use crate::common::{self, ComputeArgs, Model, ModelArgs};
use crate::run_record::{self, RunRecord};
use crate::UsageError;

#[derive(Args, Debug)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The image (PNG/JPEG, resized to the model's size).
    #[arg(long, short = 'i', value_name = "IMAGE")]
    pub image: PathBuf,
    /// The mask (resized to the model's size): white (>= 50% grey) is kept, black is repainted,
    /// as diffusers' RePaintPipeline reads it (--invert-mask: the other way round).
    #[arg(long, value_name = "MASK")]
    pub mask: PathBuf,
    /// Repaint the white part of the mask and keep the black.
    #[arg(long)]
    pub invert_mask: bool,
    /// Denoising steps before jumps (diffusers' default 250).
    #[arg(long, default_value_t = 250)]
    pub steps: usize,
    /// Steps gone back up at each jump.
    #[arg(long, default_value_t = 10)]
    pub jump_length: usize,
    /// Times each jump point is passed (1: no resampling).
    #[arg(long, default_value_t = 10)]
    pub jump_n_sample: usize,
    /// DDIM's η of the denoising steps.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
    /// Repaintings to make, side by side in the output.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub num_images: usize,
    /// The seed of the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The result: one PNG row of the repaintings.
    #[arg(long, short = 'o', value_name = "OUT.png")]
    pub output: PathBuf,
    /// Enlarge the images k times (nearest neighbour).
    #[arg(long, default_value_t = 1)]
    pub upscale: u32,
    /// Replace an existing output, whatever made it.
    #[arg(long)]
    pub overwrite: bool,
}

/// `ddim inpaint`: check, load, repaint, write the row with its record.
pub fn run(args: InpaintArgs) -> Result<()> {
    common::check_upscale(args.upscale)?;
    if args.num_images == 0 || args.num_images > 64 {
        return Err(UsageError(format!("-n {}: must be between 1 and 64", args.num_images)).into());
    }
    let options = RepaintOptions {
        num_inference_steps: args.steps,
        jump_length: args.jump_length,
        jump_n_sample: args.jump_n_sample,
        eta: args.eta,
    };
    let model = common::open_model(&args.model, None, &args.compute)?;
    let walk = pipeline::repaint_timesteps(&options, model.scheduler_config.num_train_timesteps)
        .map_err(|e| {
            UsageError(format!(
                "--steps / --jump-length / --jump-n-sample / --eta: {e}"
            ))
        })?;
    let record = record_of(&args, &model)?;
    if run_record::check_files(&[&args.output], &record, args.overwrite)?[0] {
        run_record::report_nothing_to_do(&[&args.output]);
        return Ok(());
    }
    let shape = pipeline::noise_shape(&model.unet, args.num_images)?;
    let size = Some((shape[3] as u32, shape[2] as u32));
    let image = image_io::load_image(&args.image, shape[1], size)
        .with_context(|| format!("reading --image {}", args.image.display()))?
        .to_device(&model.device)?
        .broadcast_as(shape.to_vec())?
        .contiguous()?;
    // white keeps: values in [-1, 1], kept from 0 (50% grey) up
    let grey = image_io::load_image(&args.mask, 1, size)
        .with_context(|| format!("reading --mask {}", args.mask.display()))?
        .to_device(&model.device)?;
    let keep = grey.ge(0.0)?.to_dtype(DType::F32)?;
    let mask = if args.invert_mask {
        keep.affine(-1.0, 1.0)?
    } else {
        keep
    };
    let bar = common::progress(walk.len() as u64, args.model.quiet, "inpainting", "steps");
    let x = pipeline::repaint(
        &model.unet,
        &model.scheduler_config,
        &options,
        &image,
        &mask,
        &mut Generator::per_image(args.seed, 0, args.num_images),
        &mut |_, _| {
            bar.inc(1);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let frames = image_io::to_images(&x)?
        .iter()
        .map(|img| image_io::upscale_nearest(img, args.upscale))
        .collect::<ddim::Result<Vec<_>>>()?;
    run_record::write_file_with_record(&args.output, &record, || {
        Ok(image_io::save_png(
            &image_io::make_grid(&frames, Some(frames.len()), 2)?,
            &args.output,
        )?)
    })?;
    eprintln!(
        "wrote {} ({} repainting(s), {} steps of the RePaint walk)",
        args.output.display(),
        args.num_images,
        walk.len()
    );
    Ok(())
}

/// What decides the output: the model, the image and mask (by content) and every option.
fn record_of(args: &InpaintArgs, model: &Model) -> Result<RunRecord> {
    let mut r = model.run_record("inpaint", SchedulerKind::Ddpm, &args.compute)?;
    r.set(
        "image_sha256",
        run_record::sha256_files(std::slice::from_ref(&args.image))?,
    )
    .set(
        "mask_sha256",
        run_record::sha256_files(std::slice::from_ref(&args.mask))?,
    )
    .set("invert_mask", args.invert_mask)
    .set("steps", args.steps)
    .set("jump_length", args.jump_length)
    .set("jump_n_sample", args.jump_n_sample)
    .set("eta", args.eta)
    .set("num_images", args.num_images)
    .set("seed", args.seed)
    .set("upscale", args.upscale);
    r.note("image", args.image.display().to_string())
        .note("mask", args.mask.display().to_string());
    Ok(r)
}
