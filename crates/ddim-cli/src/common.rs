//! What the sampling commands share: finding and loading the model, the device, the scheduler
//! config, the progress bar and writing images.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use ddim::loader::{load_unet, UNetFiles};
use ddim::scheduler::{SchedulerConfig, SchedulerKind, TimestepSpacing};
use ddim::unet::{UNet2DConfig, UNet2DModel};
use indicatif::{ProgressBar, ProgressStyle};

use crate::UsageError;

/// Where the model runs.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU (always available).
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
    /// The Apple GPU (needs a build with `--features metal`).
    Metal,
}

/// A floating-point dtype, for weights (`ddim convert`) or for the UNet's computation.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The dtype the UNet computes in, for the commands that run it.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// The dtype the UNet computes in; its weights are converted at load, and the scheduler
    /// always works in f32. On the CPU, f32 is the fastest except that bf16, on CPUs with
    /// AVX512-BF16 (refused elsewhere), keeps f32 weights and activations and runs the
    /// convolutions' products in bf16 with f32 sums, like PyTorch's CPU autocast; f16 runs on
    /// candle's slower f16 CPU kernels. On cuda or metal the UNet runs wholly in f16 or bf16.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

/// The arguments every command that runs a model takes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A diffusers model folder (pipeline, unet or flat layout) or a Hugging Face hub id such as
    /// google/ddpm-cifar10-32 [default: the built-in MNIST model].
    #[arg(long, short = 'm', value_name = "DIR|HUB_ID")]
    pub model: Option<String>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Use this scheduler_config.json instead of the model folder's (a config of any class ddim
    /// implements: DDIM, DDPM, DPM-Solver, UniPC, DEIS, Euler, Heun, PNDM, LMS, ...).
    #[arg(long, value_name = "FILE.json")]
    pub scheduler_config: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// A model ready to run, with its scheduler config.
pub struct Model {
    /// The folder it came from, or a description of the built-in model.
    pub source: String,
    /// Its files; `None` for the built-in model.
    pub files: Option<UNetFiles>,
    pub config: UNet2DConfig,
    pub unet: UNet2DModel,
    pub scheduler_config: SchedulerConfig,
    /// The file the scheduler config came from; `None` for the built-in model's or defaults.
    pub scheduler_file: Option<PathBuf>,
    pub device: Device,
}

/// The model `ddim` ships: a small UNet trained by `ddim train` on MNIST-5k (see the README for
/// the command), embedded so that `ddim sample` works anywhere with no download.
pub mod builtin {
    pub const DESCRIPTION: &str = "the built-in MNIST model (28x28 grayscale digits)";
    pub const CONFIG: &str = include_str!("../assets/default-model/unet/config.json");
    pub const SCHEDULER: &str =
        include_str!("../assets/default-model/scheduler/scheduler_config.json");
    pub const WEIGHTS: &[u8] =
        include_bytes!("../assets/default-model/unet/diffusion_pytorch_model.safetensors");
}

impl Model {
    /// DDIM/DDPM samples of images `start..start + len` of a run: from `noise` (the run's x_T,
    /// all images) when given, else from x_T drawn by `generator`, which also draws the
    /// per-step noise; `on_step` runs after each step.
    pub fn sample_batch(
        &self,
        options: &ddim::pipeline::SampleOptions,
        generator: &mut ddim::pipeline::Generator,
        noise: Option<&Tensor>,
        (start, len): (usize, usize),
        on_step: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        let x_t = match noise {
            Some(t) => t.narrow(0, start, len)?,
            None => {
                let shape = ddim::pipeline::noise_shape(&self.unet, len)?;
                generator.randn(&shape, &self.device)?
            }
        };
        let x0 = ddim::pipeline::sample(
            &self.unet,
            &self.scheduler_config,
            options,
            x_t,
            generator,
            &mut |_| {
                on_step();
                Ok(())
            },
        )
        .with_context(|| format!("sampling images {start}..{}", start + len))?;
        Ok(x0)
    }

    /// SDEdit samples of `len` images from `init` (1, c, h, w) at `strength`
    /// ([`ddim::pipeline::sdedit`]), every image with its own noise from `generator`.
    pub fn sdedit_batch(
        &self,
        options: &ddim::pipeline::SampleOptions,
        generator: &mut ddim::pipeline::Generator,
        (init, strength): (&Tensor, f64),
        len: usize,
        on_step: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        let dims = init.dims();
        let init = init
            .broadcast_as((len, dims[1], dims[2], dims[3]))?
            .contiguous()?;
        Ok(ddim::pipeline::sdedit(
            &self.unet,
            &self.scheduler_config,
            options,
            &init,
            strength,
            generator,
            &mut |_| {
                on_step();
                Ok(())
            },
        )?)
    }

    /// DDIM inversion of `x0` at `steps` steps (its scheduler config), with a progress bar
    /// unless `quiet`.
    pub fn invert(
        &self,
        x0: &Tensor,
        steps: usize,
        labels: Option<&Tensor>,
        quiet: bool,
    ) -> Result<Tensor> {
        let bar = progress(steps as u64, quiet, "inverting", "steps");
        let x_t = ddim::pipeline::invert(
            &self.unet,
            &self.scheduler_config,
            x0,
            steps,
            labels,
            &mut |_| {
                bar.inc(1);
                Ok(())
            },
        )?;
        bar.finish_and_clear();
        Ok(x_t)
    }

    /// A SHA-256 of the UNet's config and weights files (of the embedded bytes for the built-in
    /// model): the model's identity in a run record, wherever the folder is.
    pub fn sha256(&self) -> Result<String> {
        let Some(files) = &self.files else {
            return Ok(crate::run_record::sha256_hex([
                builtin::CONFIG.as_bytes(),
                builtin::WEIGHTS,
            ]));
        };
        unet_files_sha256(files)
    }

    /// A run record of `command` holding what every command that runs this model records: the
    /// model's hash, the scheduler config as `kind` reads it (`scheduler.*`) and the dtype; the
    /// model's source and the device as notes.
    pub fn run_record(
        &self,
        command: &str,
        kind: ddim::scheduler::SchedulerKind,
        compute: &ComputeArgs,
    ) -> Result<crate::run_record::RunRecord> {
        let mut r = crate::run_record::RunRecord::new(command);
        r.set("model_sha256", self.sha256()?)
            .set_all("scheduler", &self.scheduler_config.to_json(kind))
            .set("dtype", compute.dtype.dtype().as_str());
        r.note("model", self.source.clone()).note(
            "device",
            format!("{:?}", self.device.location()).to_lowercase(),
        );
        Ok(r)
    }

    /// Refuses a scheduler config whose `_class_name` is a sampler ddim does not implement:
    /// diffusers' pipelines sample such a folder with that sampler, so DDIM in its place would
    /// silently give other images. `DDPMScheduler` and `DDIMScheduler` configs are sampled with
    /// DDIM by default, as `DDIMPipeline` does with a DDPM-trained model.
    pub fn check_scheduler_class(&self) -> Result<()> {
        let Some(name) = self.scheduler_config.class_name.as_deref() else {
            return Ok(());
        };
        let implemented = ddim::scheduler::implemented_names();
        if ddim::scheduler::SchedulerKind::from_class_name(name)
            .is_some_and(|k| implemented.split(", ").any(|n| n == k.class_name()))
        {
            return Ok(());
        }
        let file = self
            .scheduler_file
            .as_ref()
            .map_or_else(|| self.source.clone(), |p| p.display().to_string());
        Err(UsageError(format!(
            "{file}: the scheduler config names `{name}`, which ddim does not implement (yet); \
             it reads {implemented} configs (DDPMScheduler configs are sampled with DDIM unless \
             --scheduler says otherwise, as DDIMPipeline does). To sample this model anyway, \
             pass --scheduler-config with one of those (e.g. `ddim schedule --save-config` \
             writes one)"
        ))
        .into())
    }
}

pub fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                return Err(UsageError(
                    "--device cuda: this ddim was built without CUDA; rebuild with \
                     `cargo install --path crates/ddim-cli --features cuda`"
                        .into(),
                )
                .into());
            }
            Device::new_cuda(0).context("opening CUDA device 0")?
        }
        DeviceArg::Metal => {
            if !candle_core::utils::metal_is_available() {
                return Err(UsageError(
                    "--device metal: this ddim was built without Metal; rebuild with \
                     `cargo install --path crates/ddim-cli --features metal`"
                        .into(),
                )
                .into());
            }
            Device::new_metal(0).context("opening the Metal device")?
        }
    })
}

/// Resolves `--model` (a folder or a hub id) to a local folder; hub ids go through the
/// Hugging Face cache (downloading unless HF_HUB_OFFLINE is set).
pub fn model_dir(spec: &str, quiet: bool) -> Result<PathBuf> {
    let options = ddim::hub::HubOptions {
        progress: !quiet,
        ..ddim::hub::HubOptions::from_env()
    };
    Ok(ddim::hub::resolve_model_with(spec, &options)?)
}

/// The model a sampling command runs: `--timestep-spacing` (if given) applied to its scheduler
/// config, in `--dtype`, its scheduler class one ddim implements.
pub fn open_model(args: &ModelArgs, spacing: Option<&str>, compute: &ComputeArgs) -> Result<Model> {
    let spacing = spacing.map(TimestepSpacing::from_name).transpose()?;
    let model = load_model(args, spacing, compute.dtype.dtype())?;
    model.check_scheduler_class()?;
    Ok(model)
}

/// Loads the UNet in `dtype` and the folder's scheduler config, warning about keys we do not
/// know.
pub fn load_model(
    args: &ModelArgs,
    spacing: Option<TimestepSpacing>,
    dtype: DType,
) -> Result<Model> {
    let device = device(args.device)?;
    // bf16 on the CPU: f32 weights and activations, bf16 products (AVX512-BF16 CPUs only).
    let cpu_bf16 = dtype == DType::BF16 && device.is_cpu();
    if cpu_bf16 && !ddim::ops::bf16::available() {
        return Err(UsageError(
            "--dtype bf16: bf16 products on the CPU need AVX-512F and AVX512-BF16, which this \
             CPU lacks; on this CPU use f32 (the fastest here) or f16"
                .into(),
        )
        .into());
    }
    let model = load_model_as(
        args,
        spacing,
        if cpu_bf16 { DType::F32 } else { dtype },
        device,
    )?;
    if cpu_bf16 {
        model.unet.use_bf16_products()?;
    }
    Ok(model)
}

/// [`load_model`] in `dtype` on `device`.
fn load_model_as(
    args: &ModelArgs,
    spacing: Option<TimestepSpacing>,
    dtype: DType,
    device: Device,
) -> Result<Model> {
    // Before a hub download, not after it.
    ddim::loader::check_dtype(dtype, &device)?;
    let Some(spec) = args.model.as_deref() else {
        let (config, unet) = ddim::loader::load_unet_from_bytes(
            builtin::CONFIG,
            builtin::WEIGHTS.to_vec(),
            "built-in model",
            dtype,
            &device,
        )
        .context("loading the built-in model")?;
        let mut scheduler_config = match &args.scheduler_config {
            Some(path) => read_scheduler_config(path)?,
            None => SchedulerConfig::from_json_str(builtin::SCHEDULER)?.config,
        };
        if let Some(spacing) = spacing {
            scheduler_config.timestep_spacing = spacing;
        }
        return Ok(Model {
            source: builtin::DESCRIPTION.to_string(),
            files: None,
            config,
            unet,
            scheduler_config,
            scheduler_file: args.scheduler_config.clone(),
            device,
        });
    };
    let dir = model_dir(spec, args.quiet)?;
    let loaded = load_unet(&dir, dtype, &device)
        .with_context(|| format!("loading the UNet from {}", dir.display()))?;
    if let Some(first) = loaded.non_finite_tensors.first() {
        eprintln!(
            "warning: {}: {} tensor(s) hold NaN or infinite values (first: `{first}`); samples \
             will be NaN",
            loaded.files.weights.path().display(),
            loaded.non_finite_tensors.len()
        );
    }
    for key in &loaded.unknown_config_keys {
        eprintln!(
            "warning: {}: unknown key `{key}` ignored",
            loaded.files.config.display()
        );
    }
    let scheduler_file = args
        .scheduler_config
        .clone()
        .or_else(|| loaded.scheduler_config().map(Path::to_path_buf));
    let mut scheduler_config = match &scheduler_file {
        Some(path) => read_scheduler_config(path)?,
        None => {
            eprintln!(
                "warning: {} has no scheduler_config.json; using diffusers' DDPMScheduler defaults",
                dir.display()
            );
            SchedulerConfig::default()
        }
    };
    if let Some(spacing) = spacing {
        scheduler_config.timestep_spacing = spacing;
    }
    Ok(Model {
        source: dir.display().to_string(),
        files: Some(loaded.files),
        config: loaded.config,
        unet: loaded.model,
        scheduler_config,
        scheduler_file,
        device,
    })
}

/// A SHA-256 of a UNet's config and weights files (every shard), wherever the folder is.
pub fn unet_files_sha256(files: &UNetFiles) -> Result<String> {
    let mut paths = vec![files.config.clone()];
    match &files.weights {
        ddim::loader::WeightFiles::Safetensors(p) | ddim::loader::WeightFiles::PyTorch(p) => {
            paths.push(p.clone())
        }
        ddim::loader::WeightFiles::ShardedSafetensors { index, shards } => {
            paths.push(index.clone());
            paths.extend(shards.iter().cloned());
        }
    }
    crate::run_record::sha256_files(&paths)
}

fn read_scheduler_config(path: &Path) -> Result<SchedulerConfig> {
    let loaded = SchedulerConfig::from_file(path)
        .with_context(|| format!("reading the scheduler config {}", path.display()))?;
    for key in &loaded.unknown_keys {
        eprintln!("warning: {}: unknown key `{key}` ignored", path.display());
    }
    Ok(loaded.config)
}

/// The sampler a command was asked for: `--scheduler NAME`, `--karras-sigmas` and
/// `--scheduler-option KEY=VALUE`, checked before a model is loaded.
#[derive(Clone, Debug, Default)]
pub struct SamplerChoice {
    /// The class `--scheduler` names; `None`: the one the model's config chooses.
    kind: Option<SchedulerKind>,
    /// The options the name implies, then `--karras-sigmas`, then `--scheduler-option`s.
    options: ddim::scheduler::SamplerOptions,
}

impl SamplerChoice {
    /// Parses the flags; errors name the flag and what it takes.
    pub fn parse(name: Option<&str>, karras: bool, options: &[String]) -> Result<Self> {
        let (kind, mut map) = match name {
            Some(name) => {
                let (kind, map) = ddim::scheduler::parse_sampler(name)
                    .map_err(|e| UsageError(format!("--scheduler {name}: {e}")))?;
                (Some(kind), map)
            }
            None => (None, Default::default()),
        };
        if karras {
            map.insert("use_karras_sigmas".into(), true.into());
        }
        for option in options {
            let Some((key, value)) = option.split_once('=') else {
                return Err(UsageError(format!(
                    "--scheduler-option {option}: expected KEY=VALUE, e.g. solver_order=3"
                ))
                .into());
            };
            // JSON (3, true, null, "x"), or else the text as a string (trailing, sigma_min).
            let value = serde_json::from_str(value.trim())
                .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
            map.insert(key.trim().to_string(), value);
        }
        Ok(SamplerChoice { kind, options: map })
    }

    /// The class this run samples with and its config: the model's config converted to the
    /// class `--scheduler` names (as diffusers' `from_config` does), or else to the class the
    /// config names, with DDIM for DDPM and DDIM configs (as `DDIMPipeline` samples a
    /// DDPM-trained model); then the options set.
    pub fn resolve(&self, config: &SchedulerConfig) -> Result<(SchedulerKind, SchedulerConfig)> {
        let kind = self.kind.unwrap_or(match config.kind() {
            None
            | Some(SchedulerKind::Ddpm)
            | Some(SchedulerKind::Ddim)
            | Some(SchedulerKind::DdimInverse) => SchedulerKind::Ddim,
            Some(other) => other,
        });
        self.resolve_as(config, kind)
    }

    /// [`Self::resolve`] with the class given.
    pub fn resolve_as(
        &self,
        config: &SchedulerConfig,
        kind: SchedulerKind,
    ) -> Result<(SchedulerKind, SchedulerConfig)> {
        let converted = if config.kind() == Some(kind) {
            config.clone()
        } else {
            config.converted_to(kind)?
        };
        let config = converted.with_options(&self.options).map_err(|e| {
            UsageError(format!(
                "{e} (from --scheduler, --karras-sigmas or --scheduler-option)"
            ))
        })?;
        config.check_implemented(kind)?;
        Ok((kind, config))
    }
}

/// The name a run record gives a sampler: `ddim` and `ddpm` as before, else the class name
/// (a short name's options are in the record's `scheduler.*` keys).
pub fn sampler_record_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "ddim",
        SchedulerKind::Ddpm => "ddpm",
        other => other.class_name(),
    }
}

/// The progress bar of every command: on stderr, `total` `unit`s labelled `what`, with the
/// live status in its message (hidden with --quiet).
pub fn progress(total: u64, quiet: bool, what: &str, unit: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, \
             eta {{eta}}) {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// `--eta`: a finite number >= 0.
pub fn check_eta(eta: f64) -> Result<()> {
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(UsageError(format!(
            "--eta {eta}: eta must be a finite number >= 0 (0 is deterministic DDIM, 1 has \
             DDPM's variance)"
        ))
        .into());
    }
    Ok(())
}

/// `--upscale`: 1 to 64.
pub fn check_upscale(upscale: u32) -> Result<()> {
    if upscale == 0 || upscale > 64 {
        return Err(UsageError(format!("--upscale {upscale}: must be between 1 and 64")).into());
    }
    Ok(())
}

/// Checks that a loaded x_T has the model's image shape and only finite values.
pub fn check_noise(noise: &Tensor, expected: &[usize], path: &Path) -> Result<()> {
    let dims = noise.dims();
    if dims.len() != 4 || dims[1..] != expected[1..] {
        return Err(UsageError(format!(
            "--noise {}: shape {:?} does not match the model: expected (N, {}, {}, {})",
            path.display(),
            dims,
            expected[1],
            expected[2],
            expected[3]
        ))
        .into());
    }
    if dims[0] == 0 {
        return Err(UsageError(format!(
            "--noise {}: holds no image (N = 0)",
            path.display()
        ))
        .into());
    }
    let values: Vec<f32> = noise.flatten_all()?.to_vec1()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(UsageError(format!(
            "--noise {}: value {} at flat index {i} is not finite",
            path.display(),
            values[i]
        ))
        .into());
    }
    Ok(())
}

/// Refuses to replace an existing file unless `--overwrite` was given.
pub fn refuse_existing(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        return Err(UsageError(format!(
            "{} exists; pass --overwrite to replace it",
            path.display()
        ))
        .into());
    }
    Ok(())
}
