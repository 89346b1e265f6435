//! `ddim interpolate`: DDIM samples along the great circle between the noise of two seeds, or
//! between the DDIM inversions of two real images (DDIM paper, Sec. 5.3), as a one-row grid PNG
//! or an animated GIF.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use ddim::image_io;
use ddim::pipeline::{self, Generator, SampleOptions};

use crate::common::{self, ComputeArgs, Model, ModelArgs};
use crate::run_record::{self, RunRecord};
use crate::sample_cmd::RngArg;
use crate::UsageError;
use ddim::scheduler::SchedulerKind;

#[derive(Args, Debug)]
pub struct InterpolateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The seed of the first end.
    #[arg(long, required_unless_present = "image_a", conflicts_with = "image_a")]
    pub seed_a: Option<u64>,
    /// The seed of the second end.
    #[arg(long, required_unless_present = "image_b", conflicts_with = "image_b")]
    pub seed_b: Option<u64>,
    /// A real image as the first end (PNG/JPEG, resized to the model's size): its x_T is its
    /// DDIM inversion at --steps, so the first frame reconstructs it.
    #[arg(long, value_name = "IMAGE")]
    pub image_a: Option<PathBuf>,
    /// A real image as the second end, as --image-a.
    #[arg(long, value_name = "IMAGE")]
    pub image_b: Option<PathBuf>,
    /// The number of frames, both ends included.
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Inference steps (DDIM, eta 0).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// How each end's x_T is drawn: image 0 of a default-rng run with that seed, or torch.randn.
    #[arg(long, value_enum, default_value = "default")]
    pub rng: RngArg,
    /// grid.png (one row) or anim.gif.
    #[arg(long, short = 'o', value_name = "FILE.png|FILE.gif")]
    pub output: PathBuf,
    /// Enlarge frames k times (nearest neighbour).
    #[arg(long, default_value_t = 1)]
    pub upscale: u32,
    /// Milliseconds per GIF frame.
    #[arg(long, default_value_t = 120)]
    pub frame_ms: u32,
    /// Overrides the scheduler config's timestep_spacing.
    #[arg(long, value_name = "SPACING")]
    pub timestep_spacing: Option<String>,
    /// Replace an existing output file, whatever made it. Without it, a rerun with the same
    /// settings (recorded in FILE.ddim-run.json beside the output) finds nothing to do, and one
    /// with other settings is refused.
    #[arg(long)]
    pub overwrite: bool,
}

/// `ddim interpolate`: DDIM (η = 0) samples of the noise along the great circle between two
/// seeds' x_T, as one grid row or a GIF, with its record beside it.
pub fn run(args: InterpolateArgs) -> Result<()> {
    let gif = check_args(&args)?;
    let model = common::open_model(&args.model, args.timestep_spacing.as_deref(), &args.compute)?;
    let record = record_of(&args, &model, gif)?;
    if run_record::check_files(&[&args.output], &record, args.overwrite)?[0] {
        run_record::report_nothing_to_do(&[&args.output]);
        return Ok(());
    }
    let frames = sample_frames(&args, &model)?;
    run_record::write_file_with_record(&args.output, &record, || {
        if gif {
            image_io::save_gif(&frames, &args.output, args.frame_ms, true)?;
        } else {
            let grid = image_io::make_grid(&frames, Some(frames.len()), 2)?;
            image_io::save_png(&grid, &args.output)?;
        }
        Ok(())
    })?;
    eprintln!("wrote {} ({} frames)", args.output.display(), frames.len());
    Ok(())
}

/// Whether the output is a GIF (else a PNG row), after checking the arguments.
fn check_args(args: &InterpolateArgs) -> Result<bool> {
    let ext = args
        .output
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let gif = match ext.as_deref() {
        Some("gif") => true,
        Some("png") => false,
        _ => {
            return Err(UsageError(format!(
                "--output {}: give a .png (a one-row grid) or a .gif (an animation)",
                args.output.display()
            ))
            .into())
        }
    };
    if args.frames < 2 || args.frames > 1000 {
        return Err(UsageError(format!(
            "--frames {}: must be between 2 and 1000",
            args.frames
        ))
        .into());
    }
    common::check_upscale(args.upscale)?;
    Ok(gif)
}

/// The frames, sampled in batches of 16 (upscaled).
fn sample_frames(args: &InterpolateArgs, model: &Model) -> Result<Vec<image::DynamicImage>> {
    let z = pipeline::interpolation_noise(
        &end_noise(args, model, args.seed_a, args.image_a.as_deref())?,
        &end_noise(args, model, args.seed_b, args.image_b.as_deref())?,
        args.frames,
    )?;
    let options = SampleOptions {
        num_inference_steps: args.steps,
        ..Default::default()
    };
    let batch = 16;
    let chunks = args.frames.div_ceil(batch);
    let bar = common::progress(
        (chunks * args.steps) as u64,
        args.model.quiet,
        "interpolating",
        "steps",
    );
    let mut frames = Vec::new();
    for c in 0..chunks {
        let start = c * batch;
        let b = batch.min(args.frames - start);
        // DDIM at η = 0 draws no noise: no generator.
        let mut scheduler = pipeline::scheduler_for(&model.scheduler_config, &options)?;
        let x = pipeline::denoise(
            &model.unet,
            scheduler.as_mut(),
            z.narrow(0, start, b)?,
            None,
            None,
            &mut |_| {
                bar.inc(1);
                Ok(())
            },
        )?;
        for img in image_io::to_images(&x)? {
            frames.push(image_io::upscale_nearest(&img, args.upscale)?);
        }
    }
    bar.finish_and_clear();
    Ok(frames)
}

/// One end's x_T: image 0 of a run seeded `seed`, or the DDIM inversion of `image`.
fn end_noise(
    args: &InterpolateArgs,
    model: &Model,
    seed: Option<u64>,
    image: Option<&std::path::Path>,
) -> Result<Tensor> {
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    match (image, seed) {
        (Some(path), _) => {
            let x0 = image_io::load_image(path, shape[1], Some((shape[3] as u32, shape[2] as u32)))
                .with_context(|| format!("reading {}", path.display()))?
                .to_device(&model.device)?;
            let x_t = model
                .invert(&x0, args.steps, None, args.model.quiet)
                .with_context(|| format!("inverting {}", path.display()))?;
            Ok(x_t)
        }
        (None, Some(seed)) => Ok(match args.rng {
            RngArg::Default => Generator::per_image(seed, 0, 1).randn(&shape, &model.device)?,
            RngArg::Torch => Generator::torch(seed).randn(&shape, &model.device)?,
        }),
        (None, None) => Err(UsageError(
            "give each end as a seed (--seed-a/--seed-b) or an image (--image-a/--image-b)".into(),
        )
        .into()),
    }
}

/// The record of an interpolation: what decides its frames (DDIM at η = 0 draws no noise beyond
/// the two ends').
fn record_of(args: &InterpolateArgs, model: &Model, gif: bool) -> Result<RunRecord> {
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    let mut r = model.run_record("interpolate", SchedulerKind::Ddim, &args.compute)?;
    r.set("steps", args.steps)
        .set("frames", args.frames)
        .set("image_shape", shape[1..].to_vec())
        .set("upscale", args.upscale);
    for (end, seed, image) in [
        ("a", args.seed_a, &args.image_a),
        ("b", args.seed_b, &args.image_b),
    ] {
        match image {
            Some(path) => {
                r.set(
                    &format!("image_{end}_sha256"),
                    run_record::sha256_files(std::slice::from_ref(path))?,
                );
                r.note(&format!("image_{end}"), path.display().to_string());
            }
            None => {
                r.set(&format!("seed_{end}"), seed);
            }
        }
    }
    if args.seed_a.is_some() || args.seed_b.is_some() {
        r.set("rng", args.rng.name());
    }
    if gif {
        r.set("frame_ms", args.frame_ms);
    }
    Ok(r)
}
