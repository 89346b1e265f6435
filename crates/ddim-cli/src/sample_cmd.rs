//! `ddim sample`: DDIM or DDPM samples from a model folder, as PNG files, a grid and/or a tensor.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use ddim::image_io;
use ddim::pipeline::{self, Generator, SampleOptions, Sampler};
use ddim::scheduler::TimestepSpacing;

use crate::common::{self, ModelArgs};
use crate::UsageError;

/// The sampler.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SamplerArg {
    /// DDIM (Song et al. 2020); deterministic at --eta 0.
    Ddim,
    /// DDPM ancestral sampling (Ho et al. 2020).
    Ddpm,
}

/// Where the noise comes from.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RngArg {
    /// Image i of a run depends only on (seed, i): the batch size and sharding change nothing.
    Default,
    /// torch.Generator().manual_seed(seed) on the CPU: the same noise as diffusers' pipelines.
    Torch,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The sampler.
    #[arg(long, value_enum, default_value = "ddim")]
    pub scheduler: SamplerArg,
    /// Inference steps [default: 50 for DDIM, 1000 for DDPM].
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's η: 0 is deterministic, 1 has DDPM's variance.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
    /// Number of images [default: 1, or the first dimension of --noise].
    #[arg(short = 'n', long = "num-images")]
    pub num_images: Option<usize>,
    /// Images per model call [default: min(n, 16); with --rng torch, all n].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// The seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The noise generator.
    #[arg(long, value_enum, default_value = "default")]
    pub rng: RngArg,
    /// x_T as an NCHW float32 .npy in model space; its first dimension sets the number of images.
    #[arg(long, value_name = "FILE.npy")]
    pub noise: Option<PathBuf>,
    /// A folder for numbered PNGs (sample_00000.png, ...), or one FILE.png for a single image.
    #[arg(
        long,
        short = 'o',
        value_name = "DIR|FILE.png",
        default_value = "samples"
    )]
    pub output: PathBuf,
    /// Also write all images as one grid PNG.
    #[arg(long, value_name = "FILE.png")]
    pub grid: Option<PathBuf>,
    /// Write the final samples in model space (before (x/2+0.5).clamp(0,1)) as NCHW float32 .npy.
    #[arg(long, value_name = "FILE.npy")]
    pub save_tensor: Option<PathBuf>,
    /// Overrides the scheduler config's timestep_spacing: leading, trailing, linspace or quad.
    #[arg(long, value_name = "SPACING")]
    pub timestep_spacing: Option<String>,
    /// The class of every image, for class-conditional models.
    #[arg(long)]
    pub class_label: Option<u32>,
    /// Enlarge written images k times (nearest neighbour), for viewing small models' output.
    #[arg(long, default_value_t = 1)]
    pub upscale: u32,
    /// Overwrite existing files instead of numbering after them.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: SampleArgs) -> Result<()> {
    let spacing = args
        .timestep_spacing
        .as_deref()
        .map(TimestepSpacing::from_name)
        .transpose()?;
    let sampler = match args.scheduler {
        SamplerArg::Ddim => Sampler::Ddim,
        SamplerArg::Ddpm => Sampler::Ddpm,
    };
    let steps = args.steps.unwrap_or(match sampler {
        Sampler::Ddim => 50,
        Sampler::Ddpm => 1000,
    });
    if !(args.eta.is_finite() && args.eta >= 0.0) {
        return Err(UsageError(format!(
            "--eta {}: eta must be a finite number >= 0 (0 is deterministic DDIM, 1 has DDPM's variance)",
            args.eta
        ))
        .into());
    }
    if args.upscale == 0 || args.upscale > 64 {
        return Err(UsageError(format!(
            "--upscale {}: must be between 1 and 64",
            args.upscale
        ))
        .into());
    }
    let single_file = args
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));

    let model = common::load_model(&args.model, spacing)?;
    let shape1 = pipeline::noise_shape(&model.unet.model, 1)?;

    // x_T from a file, if given
    let noise = match &args.noise {
        Some(path) => {
            let t = ddim::npy::read_npy_tensor(path, &model.device)
                .with_context(|| format!("reading --noise {}", path.display()))?;
            common::check_noise(&t, &shape1, path)?;
            Some(t)
        }
        None => None,
    };
    let n = match (&noise, args.num_images) {
        (Some(t), Some(n)) if n != t.dim(0)? => {
            return Err(UsageError(format!(
                "-n {n} disagrees with --noise, which holds {} images",
                t.dim(0)?
            ))
            .into())
        }
        (Some(t), _) => t.dim(0)?,
        (None, Some(0)) => {
            return Err(UsageError("-n 0: the number of images must be at least 1".into()).into())
        }
        (None, Some(n)) => n,
        (None, None) => 1,
    };
    if single_file && n != 1 {
        return Err(UsageError(format!(
            "--output {} names one file but {n} images are asked for: give a folder, or --grid FILE.png",
            args.output.display()
        ))
        .into());
    }
    let batch = match (args.rng, args.batch_size) {
        (_, Some(0)) => {
            return Err(UsageError("--batch-size 0: must be at least 1".into()).into());
        }
        (RngArg::Torch, Some(b)) if b < n => {
            return Err(UsageError(format!(
                "--batch-size {b} with --rng torch: diffusers draws the noise of all {n} images at \
                 once, so reproducing it needs one batch (--batch-size {n}), or use --rng default"
            ))
            .into());
        }
        (RngArg::Torch, _) => n,
        (RngArg::Default, Some(b)) => b.min(n),
        (RngArg::Default, None) => n.min(16),
    };
    let options = SampleOptions {
        sampler,
        num_inference_steps: steps,
        eta: args.eta,
        use_clipped_model_output: false,
        class_labels: args
            .class_label
            .map(|c| Tensor::new(&[c], &model.device))
            .transpose()?,
    };
    // Where images go: numbered after existing files unless --overwrite.
    let out_dir = if single_file {
        None
    } else {
        Some(args.output.clone())
    };
    let first_index = match &out_dir {
        Some(dir) if !args.overwrite => image_io::next_free_index(dir, "sample", "png")?,
        _ => 0,
    };
    if single_file {
        common::refuse_existing(&args.output, args.overwrite)?;
    }
    for path in [&args.grid, &args.save_tensor].into_iter().flatten() {
        common::refuse_existing(path, args.overwrite)?;
    }

    let batches = n.div_ceil(batch);
    let bar = common::progress((batches * steps) as u64, args.model.quiet, "sampling");
    let started = Instant::now();
    let keep_all = args.grid.is_some() || args.save_tensor.is_some();
    let mut all = Vec::new();
    let mut torch_gen = (args.rng == RngArg::Torch).then(|| Generator::torch(args.seed));
    let mut written = Vec::new();
    for bi in 0..batches {
        let start = bi * batch;
        let b = batch.min(n - start);
        let mut generator = match torch_gen.take() {
            Some(g) => g,
            None => Generator::per_image(args.seed, start as u64, b),
        };
        let shape = pipeline::noise_shape(&model.unet.model, b)?;
        let x_t = match &noise {
            Some(t) => t.narrow(0, start, b)?,
            None => generator.randn(&shape, &model.device)?,
        };
        let x0 = pipeline::sample(
            &model.unet.model,
            &model.scheduler_config,
            &options,
            x_t,
            &mut generator,
            &mut |_| {
                bar.inc(1);
                Ok(())
            },
        )
        .with_context(|| format!("sampling images {start}..{}", start + b))?;
        let x0 = x0.to_dtype(DType::F32)?;
        for (i, img) in image_io::to_images(&x0)?.into_iter().enumerate() {
            let img = image_io::upscale_nearest(&img, args.upscale)?;
            let path = match &out_dir {
                Some(dir) => image_io::numbered_path(dir, "sample", first_index + start + i, "png"),
                None => args.output.clone(),
            };
            image_io::save_png(&img, &path)?;
            written.push(path);
        }
        if keep_all {
            all.push(x0.to_device(&candle_core::Device::Cpu)?);
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if keep_all {
        let all = Tensor::cat(&all, 0)?;
        if let Some(path) = &args.save_tensor {
            ddim::npy::write_npy_tensor(path, &all)?;
            eprintln!("wrote {} ({:?}, model space)", path.display(), all.dims());
        }
        if let Some(path) = &args.grid {
            let images: Vec<_> = image_io::to_images(&all)?
                .iter()
                .map(|img| image_io::upscale_nearest(img, args.upscale))
                .collect::<ddim::Result<_>>()?;
            image_io::save_png(&image_io::make_grid(&images, None, 2)?, path)?;
            eprintln!("wrote {}", path.display());
        }
    }
    report(&written, n, steps, seconds);
    Ok(())
}

fn report(written: &[PathBuf], n: usize, steps: usize, seconds: f64) {
    match written {
        [] => {}
        [one] => eprintln!("wrote {}", one.display()),
        [first, .., last] => eprintln!(
            "wrote {} images: {} .. {}",
            written.len(),
            first.display(),
            file_name(last)
        ),
    }
    eprintln!(
        "{n} images x {steps} steps in {seconds:.2} s ({:.2} image-steps/s)",
        (n * steps) as f64 / seconds.max(1e-9)
    );
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
