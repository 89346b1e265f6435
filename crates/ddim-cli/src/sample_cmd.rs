//! `ddim sample`: DDIM or DDPM samples from a model folder, as PNG files, a grid and/or a tensor.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use ddim::image_io;
use ddim::pipeline::{self, Generator, SampleOptions};
use ddim::scheduler::SchedulerKind;
use ddim::scheduler::TimestepSpacing;

use crate::common::{self, ComputeArgs, Model, ModelArgs};
use crate::run_record::{Claim, RunRecord};
use crate::UsageError;

/// Where the noise comes from.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RngArg {
    /// The noise of image i depends only on (seed, i), not on the batch size or sharding, so a
    /// run can resume and be sharded.
    Default,
    /// torch.Generator().manual_seed(seed) on the CPU: the same noise as diffusers' pipelines.
    /// The noise of all n images is drawn at once, so a run cannot resume or be sharded: images
    /// are numbered after the files already in the folder (sample_00000.png, ...).
    Torch,
}

impl RngArg {
    /// The name a run record gives it.
    pub fn name(self) -> &'static str {
        match self {
            RngArg::Default => "default",
            RngArg::Torch => "torch",
        }
    }
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The sampler: ddim, ddpm, dpm++2m, dpm++3m, dpm++2m-sde, dpm++3m-sde, unipc, deis, euler,
    /// euler-a, heun, pndm, lms, or a diffusers class name (DPMSolverMultistepScheduler, ...).
    /// The model's scheduler config is converted to it as diffusers' `from_config` does
    /// [default: the class the model's scheduler config names; DDIM for DDPMScheduler and
    /// DDIMScheduler configs, as DDIMPipeline does].
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// Karras et al. (2022) sigmas, for the samplers that have them (use_karras_sigmas).
    #[arg(long)]
    pub karras_sigmas: bool,
    /// Sets a key of the sampler's scheduler config, e.g. solver_order=3,
    /// final_sigmas_type=sigma_min or timestep_spacing=trailing (repeatable; VALUE is read as
    /// JSON, or else as a string).
    #[arg(long = "scheduler-option", value_name = "KEY=VALUE")]
    pub scheduler_options: Vec<String>,
    /// Inference steps [default: 50; 1000 for DDPM].
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's η: 0 is deterministic, 1 has DDPM's variance (DDIM only).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
    /// Number of images [default: 1, or the first dimension of --noise].
    #[arg(short = 'n', long = "num-images")]
    pub num_images: Option<usize>,
    /// Images per model call [default: min(n, 16); with --rng torch, all n]. Resume or shard a
    /// run with the same -n and batch size for files byte-identical to one uninterrupted run.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// The seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The noise generator.
    #[arg(long, value_enum, default_value = "default")]
    pub rng: RngArg,
    /// x_T as an NCHW float32 .npy in model space; its first dimension sets the number of images.
    /// Images are numbered after the files already in the folder (sample_00000.png, ...).
    #[arg(long, value_name = "FILE.npy")]
    pub noise: Option<PathBuf>,
    /// SDEdit: start from this image (PNG/JPEG, resized to the model's size) noised to the level
    /// --strength sets, instead of from pure noise (DDIM or DDPM; every image starts from it,
    /// each with its own noise).
    #[arg(long, value_name = "IMAGE", conflicts_with = "noise")]
    pub init: Option<PathBuf>,
    /// With --init: the share of the --steps run, as diffusers' img2img `strength`: the last
    /// int(steps × strength) steps run, from the image noised to the first of them (1: from the
    /// first timestep; lower keeps more of the image).
    #[arg(long, default_value_t = 0.8, requires = "init")]
    pub strength: f64,
    /// A folder, or one FILE.png for a single image [default: samples, unless --grid or
    /// --save-tensor is given: then no PNG files are written besides those]. In a folder, image i
    /// of seed S is sample_s{S}_{i:06}.png; the folder's ddim-run.json records the settings, and
    /// a rerun with the same settings skips the images that exist, so an interrupted run resumes
    /// (with --rng torch or --noise: sample_00000.png, ... numbered after the files already
    /// there); a rerun with other settings is refused.
    #[arg(long, short = 'o', value_name = "DIR|FILE.png")]
    pub output: Option<PathBuf>,
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
    /// Replace what exists: a folder's images (all of them, or this shard's with --shard) and
    /// its ddim-run.json, even when they were made with other settings, so that the folder ends
    /// as a fresh one would; an existing FILE.png, --grid or --save-tensor file (each has its
    /// settings in FILE.ddim-run.json beside it: without --overwrite, one made with the same
    /// settings is kept, and one made with other settings is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Sample only shard K of N (0 <= K < N): images K*n/N .. (K+1)*n/N - 1, for job arrays
    /// writing into one folder; the shards' files together are the one-process run's, image
    /// for image. Needs the default --rng, no --noise and a folder --output; --grid and
    /// --save-tensor need N = 1.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<Shard>,
}

/// `--shard K/N`: shard K (from 0) of N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// K, from 0.
    pub index: usize,
    /// N, at least 1.
    pub count: usize,
}

impl Shard {
    /// The images of a run of `n` that this shard samples: `K·n/N .. (K+1)·n/N` in integer
    /// arithmetic, so shards 0..N cover 0..n exactly once, their sizes differing by at most one.
    fn range(self, n: usize) -> Range<usize> {
        let at = |k: usize| (k as u128 * n as u128 / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Parses `--shard K/N`; the error says what is allowed (clap adds the value and exits with 2).
fn parse_shard(s: &str) -> std::result::Result<Shard, String> {
    const ALLOWED: &str = "expected K/N with whole numbers 0 <= K < N, shards numbered from 0 \
                           (e.g. 0/8 .. 7/8; in a Slurm job array: ${SLURM_ARRAY_TASK_ID}/8)";
    let Some((k, n)) = s.split_once('/') else {
        return Err(format!("no `/` in `{s}`: {ALLOWED}"));
    };
    let number = |part: &str, what: &str| {
        part.parse::<usize>()
            .map_err(|_| format!("{what} = `{part}` is not a whole number: {ALLOWED}"))
    };
    let (index, count) = (number(k, "K")?, number(n, "N")?);
    if count == 0 {
        return Err(format!(
            "N = 0: there must be at least one shard; {ALLOWED}"
        ));
    }
    if index >= count {
        return Err(format!(
            "K = {index} is not below N = {count}: the shards of {count} are 0/{count} .. {}/{count}",
            count - 1
        ));
    }
    Ok(Shard { index, count })
}

/// Where image i of the run goes.
enum Output {
    /// `-o FILE.png`: the one image.
    File(PathBuf),
    /// `--rng torch` or `--noise`: `sample_{first + i:05}.png`, numbered after existing files.
    Numbered { dir: PathBuf, first: usize },
    /// The default: `sample_s{seed}_{i:06}.png`, which names the image, so a rerun skips it.
    Seeded { dir: PathBuf, seed: u64 },
}

impl Output {
    /// Whether `name` is an image file of a sample folder (either naming).
    fn is_image_name(name: &str) -> bool {
        let Some(stem) = name
            .strip_prefix("sample_")
            .and_then(|n| n.strip_suffix(".png"))
        else {
            return false;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match stem.strip_prefix('s').and_then(|r| r.split_once('_')) {
            Some((seed, index)) => digits(seed) && digits(index),
            None => digits(stem),
        }
    }

    fn path(&self, i: usize) -> PathBuf {
        match self {
            Output::File(path) => path.clone(),
            Output::Numbered { dir, first } => {
                image_io::numbered_path(dir, "sample", first + i, "png")
            }
            Output::Seeded { dir, seed } => image_io::seeded_path(dir, "sample", *seed, i, "png"),
        }
    }
}

/// Whether `path` holds a finished image of an earlier run. Files are written atomically, so
/// one that exists is complete; an empty one (a filesystem that lost data in a crash, a `touch`)
/// is not an image and is sampled again.
fn is_complete(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0)
}

/// The index of `sample_s{seed}_{digits}.png` when it is an image of `range`.
fn seeded_index(name: &str, seed: u64, range: &Range<usize>) -> Option<usize> {
    let digits = name
        .strip_prefix(&format!("sample_s{seed}_"))?
        .strip_suffix(".png")?;
    let i: usize = digits.parse().ok()?;
    let canonical = image_io::seeded_path(Path::new(""), "sample", seed, i, "png");
    (range.contains(&i) && canonical.as_os_str() == name).then_some(i)
}

/// `ddim sample`: parse the arguments (no model needed), load the model, plan the run (its
/// outputs claimed, what exists skipped), sample the planned batches, write what remains.
pub fn run(args: SampleArgs) -> Result<()> {
    let request = Request::parse(&args)?;
    let mut model = common::load_model(&args.model, request.spacing, args.compute.dtype.dtype())?;
    model.check_scheduler_class()?;
    let (sampler, config) = request.sampler.resolve(&model.scheduler_config)?;
    model.scheduler_config = config;
    let Some(mut plan) = Plan::new(&args, request, sampler, &model)? else {
        return Ok(()); // nothing to do, said why
    };
    let started = Instant::now();
    let sampled = sample_batches(&args, &mut plan, &model)?;
    let seconds = started.elapsed().as_secs_f64();
    write_collected(&plan, sampled.collected)?;
    report(
        &sampled.written,
        sampled.count,
        plan.options.num_inference_steps,
        seconds,
    );
    Ok(())
}

/// What the arguments ask for, checked before a model is loaded.
struct Request {
    spacing: Option<TimestepSpacing>,
    sampler: common::SamplerChoice,
    /// `--steps`; the default depends on the sampler.
    steps: Option<usize>,
    /// Where PNG files go: `-o`, or `samples/` when no other output was asked for.
    output: Option<PathBuf>,
    /// `-o FILE.png`: one image.
    single_file: bool,
}

impl Request {
    fn parse(args: &SampleArgs) -> Result<Self> {
        let spacing = args
            .timestep_spacing
            .as_deref()
            .map(TimestepSpacing::from_name)
            .transpose()?;
        let sampler = common::SamplerChoice::parse(
            args.scheduler.as_deref(),
            args.karras_sigmas,
            &args.scheduler_options,
        )?;
        common::check_eta(args.eta)?;
        common::check_upscale(args.upscale)?;
        // PNG files go where -o says, or to samples/ when no other output was asked for.
        let output = match (&args.output, &args.grid, &args.save_tensor) {
            (Some(path), _, _) => Some(path.clone()),
            (None, None, None) => Some(PathBuf::from("samples")),
            _ => None,
        };
        let single_file = output
            .as_ref()
            .and_then(|o| o.extension())
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if let Some(shard) = args.shard {
            check_shard(args, output.as_deref(), shard, single_file)?;
        }
        Ok(Request {
            spacing,
            sampler,
            steps: args.steps,
            output,
            single_file,
        })
    }
}

/// A run ready to sample: its images, batches and options, and its outputs, claimed.
struct Plan {
    /// x_T from `--noise`.
    noise: Option<Tensor>,
    /// The `--init` image (1, c, h, w) and `--strength`.
    init: Option<(Tensor, f64)>,
    /// UNet calls per batch.
    calls: usize,
    /// The run's number of images (all shards).
    n: usize,
    batch: usize,
    options: SampleOptions,
    /// The images this process samples: all n, or its shard's share.
    range: Range<usize>,
    /// Where PNG files go (`None`: nowhere, or the one image exists already).
    out: Option<Output>,
    /// Whether the folder's record equals this run's, so that existing images are kept.
    resume: bool,
    /// The record of a folder output.
    folder_record: RunRecord,
    /// The record of single output files.
    file_record: RunRecord,
    /// `--grid` and `--save-tensor`, unless they exist with this run's settings.
    grid: Option<PathBuf>,
    save_tensor: Option<PathBuf>,
}

impl Plan {
    /// Reads x_T, sizes the run and claims its outputs; `None` when there is nothing to do.
    fn new(
        args: &SampleArgs,
        request: Request,
        sampler: SchedulerKind,
        model: &Model,
    ) -> Result<Option<Self>> {
        if sampler != SchedulerKind::Ddim && args.eta != 0.0 {
            return Err(UsageError(format!(
                "--eta {}: η is DDIM's; {} has none (the stochastic samplers are their own: \
                 ddpm, euler-a, dpm++2m-sde)",
                args.eta,
                sampler.class_name()
            ))
            .into());
        }
        let steps = request.steps.unwrap_or(match sampler {
            SchedulerKind::Ddpm => 1000,
            _ => 50,
        });
        // Every option and the step count checked before any output is claimed.
        ddim::scheduler::build(
            &model.scheduler_config,
            sampler,
            steps,
            ddim::scheduler::DdimStepOptions::with_eta(args.eta),
        )?;
        let shape1 = pipeline::noise_shape(&model.unet, 1)?;
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
        let init = match &args.init {
            Some(path) => Some((
                image_io::load_image(path, shape1[1], Some((shape1[3] as u32, shape1[2] as u32)))
                    .with_context(|| format!("reading --init {}", path.display()))?
                    .to_device(&model.device)?,
                args.strength,
            )),
            None => None,
        };
        let n = count_images(args, noise.as_ref())?;
        if let (true, Some(file)) = (request.single_file && n != 1, &request.output) {
            return Err(UsageError(format!(
                "--output {} names one file but {n} images are asked for: give a folder, or --grid FILE.png",
                file.display()
            ))
            .into());
        }
        let batch = batch_size(args, n)?;
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
        let calls = check_init(&model.scheduler_config, &options, init.as_ref())?;
        let range = args.shard.map_or(0..n, |s| s.range(n));
        if let Some(shard) = args.shard {
            if range.is_empty() {
                eprintln!(
                    "shard {shard}: no images to sample (-n {n} is fewer than the {} shards)",
                    shard.count
                );
                return Ok(None);
            }
            eprintln!(
                "shard {shard}: images {} .. {} of the run's {n}",
                range.start,
                range.end - 1
            );
        }
        let mut out = match request.output {
            None => None,
            Some(file) if request.single_file => Some(Output::File(file)),
            // The name of a --noise image would not say which noise it came from, and torch
            // noise is drawn for the whole batch: neither can resume per image, so they number
            // after what is there.
            Some(dir) if args.rng == RngArg::Torch || noise.is_some() => {
                Some(Output::Numbered { dir, first: 0 })
            }
            Some(dir) => Some(Output::Seeded {
                dir,
                seed: args.seed,
            }),
        };
        // Single output files (-o FILE.png, --grid, --save-tensor) each have their record
        // beside them; one made with this run's settings already is not made again.
        // The model is hashed once: the file record is the folder record and more.
        let folder_record = record_of(args, model, &options, batch)?;
        let file_record = file_record_of(args, folder_record.clone(), n)?;
        let single = match &out {
            Some(Output::File(file)) => Some(file.clone()),
            _ => None,
        };
        let files: Vec<&Path> = [&single, &args.grid, &args.save_tensor]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
        let done = crate::run_record::check_files(&files, &file_record, args.overwrite)?;
        let is_todo = |p: &Option<PathBuf>| -> Option<PathBuf> {
            let p = p.as_ref()?;
            let i = files.iter().position(|f| *f == p.as_path())?;
            (!done[i]).then(|| p.clone())
        };
        let (grid, save_tensor) = (is_todo(&args.grid), is_todo(&args.save_tensor));
        if single.is_some() && is_todo(&single).is_none() {
            out = None; // the one image exists; sampled again only for --grid or --save-tensor
        }
        if out.is_none() && done.iter().all(|&d| d) {
            crate::run_record::report_nothing_to_do(&files);
            return Ok(None);
        }
        let mut plan = Plan {
            noise,
            init,
            calls,
            n,
            batch,
            options,
            range,
            out,
            resume: false,
            folder_record,
            file_record,
            grid,
            save_tensor,
        };
        plan.claim_folder(args)?;
        Ok(Some(plan))
    }

    /// Checks the folder's run record (and writes it when new) before anything else is
    /// written; with the same settings the run resumes, skipping the images that exist.
    fn claim_folder(&mut self, args: &SampleArgs) -> Result<()> {
        let mut claim = None;
        if let Some(Output::Numbered { dir, .. } | Output::Seeded { dir, .. }) = &self.out {
            let record = &self.folder_record;
            let (seed, shard_range) = (args.seed, self.range.clone());
            let this_shard = move |name: &str| seeded_index(name, seed, &shard_range).is_some();
            let removable: &dyn Fn(&str) -> bool = if args.shard.is_some() {
                &this_shard
            } else {
                &Output::is_image_name
            };
            claim = Some(crate::run_record::claim_folder(
                dir,
                record,
                args.overwrite,
                &Output::is_image_name,
                removable,
            )?);
        }
        if let Some(Output::Numbered { dir, first }) = &mut self.out {
            *first = image_io::next_free_index(dir, "sample", "png")?;
        }
        self.resume = matches!(self.out, Some(Output::Seeded { .. })) && claim == Some(Claim::Same);
        let Some(Output::Seeded { dir, seed }) = &self.out else {
            return Ok(());
        };
        remove_leftover_temp_files(dir, *seed, &self.range)?;
        if !self.resume {
            return Ok(());
        }
        // Resume: the images that an earlier run of this command finished are skipped.
        let existing = self.range.clone().filter(|&i| !self.must_write(i)).count();
        let (folder, total) = (dir.display(), self.range.len());
        if existing == 0 {
            return Ok(());
        }
        if let Some(path) = &self.save_tensor {
            return Err(UsageError(format!(
                "--save-tensor {}: needs the model-space values of all {total} images, but \
                 {existing} of them exist in {folder} already and would be skipped; pass \
                 --overwrite to sample them all again, or leave out --save-tensor",
                path.display(),
            ))
            .into());
        }
        if existing == total {
            eprintln!(
                "all {existing} images exist in {folder} already: nothing to sample (--overwrite \
                 samples them again)",
            );
        } else {
            eprintln!(
                "{existing} of the {total} images exist in {folder} already (same settings, see \
                 its {}): skipping them, sampling the other {} (--overwrite samples all again)",
                crate::run_record::RECORD_NAME,
                total - existing
            );
        }
        Ok(())
    }

    /// Whether image `i` is to be written: always, unless the run resumes and it exists.
    fn must_write(&self, i: usize) -> bool {
        match &self.out {
            Some(out) if self.resume => !is_complete(&out.path(i)),
            _ => true,
        }
    }

    /// The images of batch `b` that this process owns (its shard's part of the batch).
    fn owned(&self, b: usize) -> Range<usize> {
        let (batch, range) = (self.batch, &self.range);
        (b * batch).max(range.start)..(b + 1).saturating_mul(batch).min(range.end)
    }

    /// The batches to sample. Exactly n images, in batches aligned to multiples of the batch
    /// size: batch k holds images k·B .. min((k+1)·B, n), the last one smaller when B does not
    /// divide n. (The official DDIM code samples floor(50000 / B) full batches for FID: 49,984
    /// of 50,000 images at B = 64.) A shard or a resumed run samples the same batches as one
    /// uninterrupted run, whole, and writes only the images it owns that are missing. The noise
    /// of an image depends only on (seed, i), but the UNet's float sums can depend on the
    /// batch's shape (matrix-product blocking), so keeping the batches is what makes every file
    /// byte-identical to the uninterrupted run's; it costs at most one batch per shard boundary
    /// or resumed batch.
    fn batches(&self) -> Vec<usize> {
        (self.range.start / self.batch..self.range.end.div_ceil(self.batch))
            .filter(|&b| self.save_tensor.is_some() || self.owned(b).any(|i| self.must_write(i)))
            .collect()
    }
}

/// The run's number of images: `-n`, or the --noise file's, which must agree.
fn count_images(args: &SampleArgs, noise: Option<&Tensor>) -> Result<usize> {
    Ok(match (noise, args.num_images) {
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
    })
}

/// The batch size: `--batch-size` (at most n), 16 by default; with `--rng torch`, all n.
fn batch_size(args: &SampleArgs, n: usize) -> Result<usize> {
    Ok(match (args.rng, args.batch_size) {
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
    })
}

/// What the batches produced.
struct Sampled {
    /// The PNG files written.
    written: Vec<PathBuf>,
    /// The images sampled (whole batches).
    count: usize,
    collected: Collected,
}

/// What `--save-tensor` and `--grid` need, gathered while sampling.
#[derive(Default)]
struct Collected {
    /// Each batch's rows of this process's images, model space, on the CPU.
    tensors: Vec<Tensor>,
    /// The images, when no PNG files are written.
    in_memory: Vec<image::DynamicImage>,
}

/// Samples the planned batches, writing each image as it is done (atomically: stopping at any
/// moment loses only unfinished work).
fn sample_batches(args: &SampleArgs, plan: &mut Plan, model: &Model) -> Result<Sampled> {
    let batches = plan.batches();
    let hint = match (&plan.out, args.overwrite) {
        (Some(Output::Seeded { .. }), false) => "; run the same command again to sample the rest",
        (Some(Output::Seeded { .. }), true) => {
            "; run it again without --overwrite to sample the rest"
        }
        _ => "",
    };
    let _ = ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: the image files written so far are complete{hint}");
        std::process::exit(130);
    });
    // The one-time weight transforms belong to the load, not to the first step's time.
    if let (Some(&b), [_, _, h, w]) = (batches.first(), pipeline::noise_shape(&model.unet, 1)?) {
        model
            .unet
            .prepare(plan.batch.min(plan.n - b * plan.batch), h, w);
    }
    let steps = plan.calls;
    let bar = common::progress(
        (batches.len() * steps) as u64,
        args.model.quiet,
        "sampling",
        "steps",
    );
    let mut torch_gen = (args.rng == RngArg::Torch).then(|| Generator::torch(args.seed));
    let mut done = Sampled {
        written: Vec::new(),
        count: 0,
        collected: Collected::default(),
    };
    for b in batches {
        let own = plan.owned(b);
        // Checked again now: another process (a duplicate shard) may have written some.
        let todo: Vec<usize> = own.clone().filter(|&i| plan.must_write(i)).collect();
        if todo.is_empty() && plan.save_tensor.is_none() {
            bar.inc(steps as u64);
            continue;
        }
        let start = b * plan.batch;
        let len = plan.batch.min(plan.n - start);
        let mut generator = match torch_gen.take() {
            Some(g) => g,
            None => Generator::per_image(args.seed, start as u64, len),
        };
        let x0 = match &plan.init {
            Some((init, strength)) => model.sdedit_batch(
                &plan.options,
                &mut generator,
                (init, *strength),
                len,
                &mut || bar.inc(1),
            )?,
            None => model.sample_batch(
                &plan.options,
                &mut generator,
                plan.noise.as_ref(),
                (start, len),
                &mut || bar.inc(1),
            )?,
        };
        done.count += len;
        let x0 = x0.to_dtype(DType::F32)?;
        let images = image_io::to_images(&x0)?;
        for i in todo {
            let img = image_io::upscale_nearest(&images[i - start], args.upscale)?;
            match &plan.out {
                Some(Output::File(path)) => {
                    crate::run_record::write_file_with_record(path, &plan.file_record, || {
                        Ok(image_io::save_png(&img, path)?)
                    })?;
                    done.written.push(path.clone());
                }
                Some(out) => {
                    let path = out.path(i);
                    image_io::save_png(&img, &path)?;
                    done.written.push(path);
                }
                None => done.collected.in_memory.push(img),
            }
        }
        if plan.save_tensor.is_some() {
            let rows = x0.narrow(0, own.start - start, own.len())?;
            done.collected
                .tensors
                .push(rows.to_device(&candle_core::Device::Cpu)?);
        }
    }
    bar.finish_and_clear();
    Ok(done)
}

/// Writes `--save-tensor` and `--grid`, each with its record.
fn write_collected(plan: &Plan, mut collected: Collected) -> Result<()> {
    let record = &plan.file_record;
    if let Some(path) = &plan.save_tensor {
        let all = Tensor::cat(&collected.tensors, 0)?;
        crate::run_record::write_file_with_record(path, record, || {
            Ok(ddim::npy::write_npy_tensor(path, &all)?)
        })?;
        eprintln!("wrote {} ({:?}, model space)", path.display(), all.dims());
    }
    if let Some(path) = &plan.grid {
        // From the files, so that images skipped on a resume are in it too.
        let images: Vec<_> = match &plan.out {
            Some(out) => plan
                .range
                .clone()
                .map(|i| image_io::open_image(&out.path(i)))
                .collect::<ddim::Result<_>>()?,
            None => std::mem::take(&mut collected.in_memory),
        };
        let grid_image = image_io::make_grid(&images, None, 2)?;
        crate::run_record::write_file_with_record(path, record, || {
            Ok(image_io::save_png(&grid_image, path)?)
        })?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The UNet calls of one batch, after checking `--init`/`--strength` against the sampler and
/// the steps (SDEdit runs int(steps × strength) of them).
fn check_init(
    config: &ddim::scheduler::SchedulerConfig,
    options: &SampleOptions,
    init: Option<&(Tensor, f64)>,
) -> Result<usize> {
    let calls = pipeline::scheduler_for(config, options)?
        .model_timesteps()
        .len();
    let Some(&(_, strength)) = init else {
        return Ok(calls);
    };
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(UsageError(format!(
            "--strength {strength}: must be in (0, 1], the share of the steps run from the \
             noised image"
        ))
        .into());
    }
    if !matches!(options.sampler, SchedulerKind::Ddim | SchedulerKind::Ddpm) {
        return Err(UsageError(format!(
            "--init: SDEdit runs with ddim or ddpm (it noises the image by the DDPM forward \
             process), not {}",
            options.sampler.class_name()
        ))
        .into());
    }
    let run = ((options.num_inference_steps as f64 * strength) as usize).min(calls);
    if run == 0 {
        return Err(UsageError(format!(
            "--strength {strength}: {} steps × {strength} leaves no step to run; raise --steps or \
             --strength",
            options.num_inference_steps
        ))
        .into());
    }
    Ok(run)
}

/// The run record of a sample folder: what decides its images. The seed is not in it (it is in
/// each file's name, and a folder may hold several seeds' images); batch size and device are
/// notes, since they move only float rounding.
fn record_of(
    args: &SampleArgs,
    model: &Model,
    options: &SampleOptions,
    batch: usize,
) -> Result<RunRecord> {
    let kind = options.sampler;
    let sampler = common::sampler_record_name(kind);
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    let mut r = model.run_record("sample", kind, &args.compute)?;
    r.set("sampler", sampler)
        .set("steps", options.num_inference_steps)
        .set("eta", options.eta)
        .set(
            "x_T",
            if args.noise.is_some() {
                "--noise file"
            } else {
                "drawn"
            },
        )
        .set("rng", args.rng.name())
        .set("image_shape", shape[1..].to_vec())
        .set("class_label", args.class_label)
        .set("upscale", args.upscale);
    if let Some(path) = &args.init {
        r.set(
            "init_sha256",
            crate::run_record::sha256_files(std::slice::from_ref(path))?,
        )
        .set("strength", args.strength);
        r.note("init", path.display().to_string());
    }
    r.note("batch_size", batch);
    Ok(r)
}

/// The run record of a single output file (-o FILE.png, --grid, --save-tensor): the folder's
/// settings, and what a folder keeps in its file names: the seed, the number of images and the
/// --noise file's bytes.
fn file_record_of(args: &SampleArgs, mut r: RunRecord, n: usize) -> Result<RunRecord> {
    r.set("num_images", n);
    match &args.noise {
        Some(path) => r.set(
            "noise_sha256",
            crate::run_record::sha256_files(std::slice::from_ref(path))?,
        ),
        None => r.set("seed", args.seed),
    };
    Ok(r)
}

/// Refuses `--shard` where a shard cannot be a share of one run.
fn check_shard(
    args: &SampleArgs,
    output: Option<&Path>,
    shard: Shard,
    single_file: bool,
) -> Result<()> {
    let why = if args.rng == RngArg::Torch {
        Some(
            "--rng torch draws the noise of all n images at once, so a shard cannot draw its own \
             share; use the default --rng, whose image i depends only on (seed, i)"
                .to_string(),
        )
    } else if let Some(noise) = &args.noise {
        Some(format!(
            "--noise {} gives x_T, and its images are numbered after the files already in the \
             folder, which shards cannot share; split the .npy file and run one command per part",
            noise.display()
        ))
    } else if let (true, Some(file)) = (single_file, output) {
        Some(format!(
            "--output {} names one file; shards write into one folder",
            file.display()
        ))
    } else if output.is_none() {
        Some("shards write into one folder: give it with -o DIR".to_string())
    } else if shard.count > 1 {
        [("--grid", &args.grid), ("--save-tensor", &args.save_tensor)]
            .into_iter()
            .find_map(|(flag, path)| {
                path.as_ref().map(|p| {
                    format!(
                        "{flag} {} needs the images of all shards; make it after they have all \
                         finished (e.g. with a run without --shard, which skips the images that \
                         exist), or leave it out",
                        p.display()
                    )
                })
            })
    } else {
        None
    };
    match why {
        Some(why) => Err(UsageError(format!("--shard {shard}: {why}")).into()),
        None => Ok(()),
    }
}

/// Removes the temporary files that a killed run left behind for this run's images (hidden
/// `.sample_s{seed}_{i}.png.*.tmp` files; never a finished image, never another shard's).
fn remove_leftover_temp_files(dir: &Path, seed: u64, range: &Range<usize>) -> Result<()> {
    for (target, temp) in image_io::leftover_temp_files(dir)? {
        if seeded_index(&target, seed, range).is_some() {
            match std::fs::remove_file(&temp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    eprintln!(
                        "warning: cannot remove the unfinished {}: {e}",
                        temp.display()
                    )
                }
            }
        }
    }
    Ok(())
}

fn report(written: &[PathBuf], sampled: usize, steps: usize, seconds: f64) {
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
    if sampled > 0 {
        eprintln!(
            "{sampled} images x {steps} steps in {seconds:.2} s ({:.2} image-steps/s)",
            (sampled * steps) as f64 / seconds.max(1e-9)
        );
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_run_exactly_once() {
        for n in [1, 2, 3, 10, 40, 50_000] {
            for count in 1..=9 {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard { index, count }.range(n);
                    assert_eq!(r.start, next, "n {n}, shard {index}/{count}");
                    assert!(r.len() <= n / count + 1);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
        let huge = Shard { index: 3, count: 4 };
        assert_eq!(huge.range(usize::MAX).end, usize::MAX);
    }

    #[test]
    fn shard_values_parse_or_say_what_is_allowed() {
        assert_eq!(parse_shard("2/8"), Ok(Shard { index: 2, count: 8 }));
        assert_eq!(parse_shard("0/1"), Ok(Shard { index: 0, count: 1 }));
        for bad in [
            "3/3", "a/b", "1/0", "0/0", "1", "", "-1/2", "1/-2", "1/2/3", " 1/2",
        ] {
            let e = parse_shard(bad).unwrap_err();
            assert!(
                e.contains("0 <= K < N") || e.contains("0/3 .. 2/3"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn seeded_names_parse_back_only_in_range() {
        let r = 10..20;
        assert_eq!(seeded_index("sample_s3_000012.png", 3, &r), Some(12));
        assert_eq!(seeded_index("sample_s3_000012.png", 4, &r), None);
        assert_eq!(seeded_index("sample_s3_000022.png", 3, &r), None);
        assert_eq!(seeded_index("sample_s3_12.png", 3, &r), None);
        assert_eq!(seeded_index("sample_s3_000012.jpg", 3, &r), None);
    }
}
