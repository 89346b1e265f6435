//! `ddim train`: trains a UNet with the DDPM objective on a folder of images or a built-in set,
//! saving diffusers-layout checkpoints and the training state for `--resume`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use ddim::image_io;
use ddim::pipeline::{self, Generator, SampleOptions};
use ddim::scheduler::{PredictionType, SchedulerConfig};
use ddim::train::{self, Dataset, EmaDecay, Fit, LrSchedule, TrainConfig, Trainer};
use ddim::unet::UNet2DConfig;

use crate::common::{self, DeviceArg};
use crate::plot::{self, LineChart, Series};
use crate::UsageError;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A folder of PNG/JPEG images (searched recursively), or a built-in set: digits (1,797 8×8
    /// UCI digits) or mnist5k (5,000 28×28 MNIST digits).
    #[arg(long, value_name = "DIR|digits|mnist5k")]
    pub data: String,
    /// Where checkpoints go: a diffusers pipeline folder (EMA weights) plus the training state.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
    /// Continue the run saved in --output (its config is kept; --steps may raise the total).
    #[arg(long)]
    pub resume: bool,
    /// Start from this model's weights (a diffusers folder or hub id, e.g. the built-in model's
    /// folder in this repository) instead of a seeded initialisation: its UNet config (at
    /// --resolution) and, unless --scheduler-config is given, its noise schedule. The AdamW
    /// moments start at zero and the EMA at the given weights.
    #[arg(long, value_name = "DIR|HUB_ID", conflicts_with_all = ["preset", "unet_config", "resume"])]
    pub init_from: Option<String>,
    /// A diffusers UNet config.json to train (sample_size is set to --resolution).
    #[arg(long, value_name = "FILE.json", conflicts_with = "preset")]
    pub unet_config: Option<PathBuf>,
    /// A built-in architecture: tiny, small or ddpm-cifar10 [default: small].
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Image size [default: the built-in set's own size; required for folders].
    #[arg(long, value_name = "PIXELS")]
    pub resolution: Option<usize>,
    /// How images of another size are brought to the resolution: crop (resize the shorter side,
    /// centre crop), stretch, or pad (centre on black) [default: crop].
    #[arg(long, value_name = "MODE")]
    pub fit: Option<String>,
    /// 1 (grayscale) or 3 (RGB) [default: RGB if any image has colour].
    #[arg(long)]
    pub channels: Option<usize>,
    /// Total optimisation steps [default: 10000].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate of AdamW [default: 1e-4].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// constant or cosine (after the warmup) [default: cosine].
    #[arg(long, value_name = "SCHEDULE")]
    pub lr_schedule: Option<String>,
    /// Linear learning-rate warmup steps [default: 500].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay [default: 1e-6].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Clip the gradient norm to this; 0 turns clipping off [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub max_grad_norm: Option<f64>,
    /// The EMA decay: the cap of diffusers' EMA warmup, or the fixed decay with --ema-fixed
    /// [default: 0.9999].
    #[arg(long, allow_negative_numbers = true)]
    pub ema_decay: Option<f64>,
    /// Use --ema-decay at every step instead of diffusers' EMA warmup (1 - (1+step)^-0.75).
    #[arg(long)]
    pub ema_fixed: bool,
    /// What the model learns to predict: epsilon, v_prediction or sample [default: epsilon].
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,
    /// A scheduler_config.json giving the noise schedule [default: DDPM linear, 1000 steps].
    #[arg(long, value_name = "FILE.json")]
    pub scheduler_config: Option<PathBuf>,
    /// Flip images horizontally at random (not for digits).
    #[arg(long)]
    pub random_flip: bool,
    /// Seeds the weights and every random choice of the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a checkpoint every K steps (and at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 1000, value_name = "K")]
    pub save_every: u64,
    /// Write a grid of 16 EMA samples (DDIM, 50 steps) every K steps; 0 for never.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub sample_every: u64,
    /// Where the model trains.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl TrainArgs {
    /// The flags that define a run, which a resumed run takes from its checkpoint instead.
    fn run_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--unet-config", self.unet_config.is_some()),
            ("--preset", self.preset.is_some()),
            ("--init-from", self.init_from.is_some()),
            ("--batch-size", self.batch_size.is_some()),
            ("--lr", self.lr.is_some()),
            ("--lr-schedule", self.lr_schedule.is_some()),
            ("--warmup-steps", self.warmup_steps.is_some()),
            ("--weight-decay", self.weight_decay.is_some()),
            ("--max-grad-norm", self.max_grad_norm.is_some()),
            ("--ema-decay", self.ema_decay.is_some()),
            ("--ema-fixed", self.ema_fixed),
            ("--prediction-type", self.prediction_type.is_some()),
            ("--scheduler-config", self.scheduler_config.is_some()),
            ("--random-flip", self.random_flip),
            ("--seed", self.seed.is_some()),
        ];
        given.iter().filter(|(_, g)| *g).map(|(n, _)| *n).collect()
    }
}

fn usage(msg: String) -> anyhow::Error {
    UsageError(msg).into()
}

/// The weights, UNet config and noise schedule of `--init-from`.
struct InitModel {
    /// What the run records: the model as given and its weights' SHA-256.
    description: String,
    unet: UNet2DConfig,
    scheduler: Option<SchedulerConfig>,
    weights: HashMap<String, Tensor>,
}

fn open_init_model(spec: &str, quiet: bool) -> Result<InitModel> {
    let dir = common::model_dir(spec, quiet)?;
    let files = ddim::loader::find_unet_files(&dir)
        .with_context(|| format!("--init-from {spec}: reading the model's UNet"))?;
    let (unet, unknown) = UNet2DConfig::from_file(&files.config)?;
    for key in unknown {
        eprintln!(
            "warning: {}: unknown key `{key}` ignored",
            files.config.display()
        );
    }
    let weights: HashMap<String, Tensor> = ddim::loader::read_unet_tensors(&files.weights)
        .with_context(|| format!("--init-from {spec}: reading the weights"))?
        .into_iter()
        .collect();
    let scheduler = match files.scheduler_config.as_deref() {
        Some(path) => Some(
            SchedulerConfig::from_file(path)
                .with_context(|| format!("reading {}", path.display()))?
                .config,
        ),
        None => None,
    };
    Ok(InitModel {
        description: format!(
            "{spec} (UNet sha256 {})",
            common::unet_files_sha256(&files)?
        ),
        unet,
        scheduler,
        weights,
    })
}

/// The run's config from the flags (and the `--init-from` model), for the dataset's channels
/// and size.
fn config_from_args(
    args: &TrainArgs,
    data: &Dataset,
    init: Option<&InitModel>,
) -> Result<TrainConfig> {
    let given = match (&args.unet_config, init) {
        (Some(path), _) => {
            let (cfg, unknown) = UNet2DConfig::from_file(path)?;
            for key in unknown {
                eprintln!("warning: {}: unknown key `{key}` ignored", path.display());
            }
            Some((format!("--unet-config {}", path.display()), cfg))
        }
        (None, Some(init)) => Some((
            format!(
                "--init-from {}",
                args.init_from.as_deref().unwrap_or_default()
            ),
            init.unet.clone(),
        )),
        (None, None) => None,
    };
    let unet = match given {
        Some((flag, mut cfg)) => {
            if cfg.in_channels != data.channels {
                return Err(usage(format!(
                    "{flag}: in_channels {} does not match the data's {} channel(s)",
                    cfg.in_channels, data.channels
                )));
            }
            cfg.sample_size = Some((data.size, data.size));
            cfg.validate()?;
            cfg
        }
        None => train::preset(
            args.preset.as_deref().unwrap_or("small"),
            data.channels,
            data.size,
        )?,
    };
    let divisor = unet.spatial_divisor();
    if !data.size.is_multiple_of(divisor) {
        return Err(usage(format!(
            "--resolution {}: this UNet halves the image {} time(s), so the resolution must be a \
             multiple of {divisor}",
            data.size,
            divisor.trailing_zeros()
        )));
    }
    let mut cfg = TrainConfig::new(unet);
    if let Some(init) = init {
        if let Some(scheduler) = &init.scheduler {
            cfg.scheduler = scheduler.clone();
        }
        cfg.init_from = Some(init.description.clone());
    }
    if let Some(path) = &args.scheduler_config {
        let loaded = SchedulerConfig::from_file(path)?;
        for key in &loaded.unknown_keys {
            eprintln!("warning: {}: unknown key `{key}` ignored", path.display());
        }
        cfg.scheduler = loaded.config;
    }
    if let Some(p) = &args.prediction_type {
        cfg.scheduler.prediction_type = PredictionType::from_name(p)?;
    }
    if let Some(v) = args.steps {
        cfg.steps = v;
    }
    if let Some(v) = args.batch_size {
        cfg.batch_size = v;
    }
    if let Some(v) = args.lr {
        cfg.adamw.lr = v;
    }
    if let Some(v) = &args.lr_schedule {
        cfg.lr_schedule = LrSchedule::from_name(v)?;
    }
    if let Some(v) = args.warmup_steps {
        cfg.warmup_steps = v;
    }
    if let Some(v) = args.weight_decay {
        cfg.adamw.weight_decay = v;
    }
    if let Some(v) = args.max_grad_norm {
        cfg.max_grad_norm = (v != 0.0).then_some(v);
    }
    let max = args.ema_decay.unwrap_or(0.9999);
    cfg.ema = if args.ema_fixed {
        EmaDecay::Fixed(max)
    } else {
        EmaDecay::Warmup {
            max,
            inv_gamma: 1.0,
            power: 0.75,
        }
    };
    if let Some(v) = args.seed {
        cfg.seed = v;
    }
    cfg.random_flip = args.random_flip;
    cfg.validate()?;
    Ok(cfg)
}

/// `ddim train`: read the data, start or resume the run, train to `--steps` with checkpoints
/// (and a checkpoint on Ctrl-C), then report.
pub fn run(args: TrainArgs) -> Result<()> {
    if args.save_every == 0 {
        return Err(usage("--save-every 0: must be at least 1".into()));
    }
    let device: Device = common::device(args.device)?;
    let started = Instant::now();
    let data = open_data(&args)?;
    let mut trainer = start_or_resume(&args, &data, &device)?;
    let (done, total) = (trainer.step_count(), trainer.config().steps);
    if !args.quiet {
        eprintln!(
            "{}; data loaded in {:.1}s",
            describe(&trainer, &data),
            started.elapsed().as_secs_f64()
        );
    }
    if done >= total {
        eprintln!(
            "{} has already trained {done} of {total} steps; pass a larger --steps to go on",
            args.output.display(),
        );
        return Ok(());
    }
    train_loop(&args, &mut trainer, &data)?;
    say!(
        "trained {} steps in {:.0}s; mean loss of the last {} steps {:.5}; model saved to {}",
        total - done,
        started.elapsed().as_secs_f64(),
        trainer.losses().len().min(100),
        recent_mean(trainer.losses(), 100),
        args.output.display()
    );
    Ok(())
}

/// The training images of `--data`, with a warning per file that could not be read.
fn open_data(args: &TrainArgs) -> Result<Dataset> {
    let fit = args
        .fit
        .as_deref()
        .map(Fit::from_name)
        .transpose()?
        .unwrap_or_default();
    let data = Dataset::open(&args.data, args.resolution, args.channels, fit)
        .with_context(|| format!("reading the training images of --data {}", args.data))?;
    for (path, reason) in &data.skipped {
        eprintln!("warning: skipped {}: {reason}", path.display());
    }
    Ok(data)
}

/// A new run in an empty `--output`, or (`--resume`) the run saved there, with its own
/// settings; either way the model must take the data's images.
fn start_or_resume(args: &TrainArgs, data: &Dataset, device: &Device) -> Result<Trainer> {
    let state = args.output.join(train::STATE_NAME);
    let trainer = if args.resume {
        let flags = args.run_flags();
        if !flags.is_empty() {
            return Err(usage(format!(
                "--resume continues the run saved in {} with its own settings; drop {}",
                args.output.display(),
                flags.join(", ")
            )));
        }
        if !state.is_file() {
            return Err(usage(format!(
                "--resume: {} holds no training state ({}); start a run without --resume",
                args.output.display(),
                train::STATE_NAME
            )));
        }
        let mut trainer = train::load_state(&args.output, device)
            .with_context(|| format!("resuming from {}", state.display()))?;
        if let Some(steps) = args.steps {
            trainer.set_total_steps(steps)?;
        }
        trainer
    } else {
        if state.exists() || args.output.join(ddim::loader::MODEL_INDEX_NAME).exists() {
            return Err(usage(format!(
                "--output {} already holds a model; pass --resume to continue its run, or choose \
                 another folder",
                args.output.display()
            )));
        }
        let init = args
            .init_from
            .as_deref()
            .map(|spec| open_init_model(spec, args.quiet))
            .transpose()?;
        let config = config_from_args(args, data, init.as_ref())?;
        let mut trainer = Trainer::new(config, device)?;
        if let Some(init) = &init {
            trainer
                .load_weights(&init.weights)
                .with_context(|| format!("--init-from {}", init.description))?;
        }
        trainer
    };
    let unet = &trainer.config().unet;
    if Some((data.size, data.size)) != unet.sample_size || data.channels != unet.in_channels {
        return Err(usage(format!(
            "--data {}: {} channel(s) at {}×{}, but the model takes {} channel(s) at {:?}; use \
             --resolution / --channels to match",
            args.data, data.channels, data.size, data.size, unet.in_channels, unet.sample_size
        )));
    }
    Ok(trainer)
}

/// What the run trains, on what, for which steps.
fn describe(trainer: &Trainer, data: &Dataset) -> String {
    let cfg = trainer.config();
    format!(
        "training {} parameters on {} images ({}, {}×{}×{}) for steps {}..{} of {} (batch {}, {})",
        trainer.num_parameters(),
        data.len,
        data.source,
        data.channels,
        data.size,
        data.size,
        trainer.step_count() + 1,
        cfg.steps,
        cfg.steps,
        cfg.batch_size,
        cfg.scheduler.prediction_type.name(),
    ) + &cfg
        .init_from
        .as_ref()
        .map(|from| format!(", starting from the weights of {from}"))
        .unwrap_or_default()
}

/// Trains to the configured step count: a checkpoint every `--save-every` steps, at the end,
/// and on Ctrl-C (then exit 130); a sample grid every `--sample-every` steps.
fn train_loop(args: &TrainArgs, trainer: &mut Trainer, data: &Dataset) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second Ctrl-C stops at once; every checkpoint file is replaced atomically, so even
        // that leaves the previous checkpoint whole.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let (total, batch) = (trainer.config().steps, trainer.config().batch_size as u64);
    let bar = common::progress(total, args.quiet, "train", "steps");
    bar.set_position(trainer.step_count());
    bar.reset_eta();
    let mut window = Instant::now();
    let mut window_steps = 0u64;
    let mut images_per_s = 0.0;
    while trainer.step_count() < total {
        let stats = match trainer.step(data) {
            Ok(s) => s,
            Err(err @ ddim::Error::Diverged { .. }) => {
                bar.abandon();
                return Err(anyhow::Error::new(err).context(format!(
                    "the last good checkpoint in {} is kept",
                    args.output.display()
                )));
            }
            Err(err) => return Err(err.into()),
        };
        window_steps += 1;
        let elapsed = window.elapsed().as_secs_f64();
        if elapsed > 2.0 {
            images_per_s = (window_steps * batch) as f64 / elapsed;
            window = Instant::now();
            window_steps = 0;
        }
        bar.set_position(stats.step);
        bar.set_message(format!(
            "loss {:.4} | {:.1} img/s | lr {:.2e}",
            stats.loss, images_per_s, stats.lr
        ));
        let step = stats.step;
        let stop = interrupted.load(Ordering::SeqCst);
        if step % args.save_every == 0 || step == total || stop {
            save(trainer, &args.output)?;
            if bar.is_hidden() && !args.quiet {
                // No terminal for the bar (a log file): one line per checkpoint instead.
                eprintln!(
                    "step {step}/{total}: loss {:.4} (mean of the last {} steps {:.4}), {:.1} img/s, lr {:.2e}, saved",
                    stats.loss,
                    args.save_every.min(step),
                    recent_mean(trainer.losses(), args.save_every as usize),
                    images_per_s,
                    stats.lr
                );
            }
        }
        if args.sample_every > 0 && step % args.sample_every == 0 {
            sample_grid(trainer, &args.output, step)?;
        }
        if stop {
            bar.abandon();
            eprintln!(
                "interrupted: saved step {step} of {total} to {}; continue with the same command and --resume",
                args.output.display()
            );
            std::process::exit(130);
        }
    }
    bar.finish();
    Ok(())
}

fn recent_mean(losses: &[f32], n: usize) -> f64 {
    let tail = &losses[losses.len().saturating_sub(n.max(1))..];
    tail.iter().map(|&l| f64::from(l)).sum::<f64>() / tail.len().max(1) as f64
}

fn save(trainer: &Trainer, dir: &Path) -> Result<()> {
    train::save_pipeline(trainer, dir)
        .and_then(|()| train::save_state(trainer, dir))
        .with_context(|| format!("saving the checkpoint to {}", dir.display()))?;
    save_loss_curve(trainer.losses(), &dir.join(LOSS_CURVE))
}

/// The loss curve beside each checkpoint.
const LOSS_CURVE: &str = "loss.png";

/// The loss of every step so far as a PNG: the mean of each block of steps (at most about 500
/// points, so the curve stays readable) on a log axis.
fn save_loss_curve(losses: &[f32], path: &Path) -> Result<()> {
    let block = losses.len().div_ceil(500).max(1);
    let points = losses
        .chunks(block)
        .enumerate()
        .map(|(i, c)| {
            let mean = c.iter().map(|&l| l as f64).sum::<f64>() / c.len() as f64;
            ((i * block + c.len()) as f64, mean)
        })
        .collect();
    let chart = LineChart {
        title: format!("training loss, steps 1 to {}", losses.len()),
        x_label: "step".into(),
        y_label: if block == 1 {
            "loss".into()
        } else {
            format!("loss, mean of {block} steps")
        },
        log_x: false,
        log_y: true,
        series: vec![Series {
            name: String::new(),
            points,
        }],
    };
    plot::save_line_chart(path, &chart, (800, 450))
        .with_context(|| format!("drawing the loss curve {}", path.display()))
}

/// 16 samples of the EMA model (DDIM, 50 steps, seed 0) as `samples/step_XXXXXX.png`.
fn sample_grid(trainer: &Trainer, dir: &Path, step: u64) -> Result<()> {
    let unet = trainer.ema_model()?;
    let n = 16;
    let shape = pipeline::noise_shape(&unet, n)?;
    let mut generator = Generator::per_image(0, 0, n);
    let x_t = generator.randn(&shape, unet.device())?;
    let x0 = pipeline::sample(
        &unet,
        &trainer.config().scheduler,
        &SampleOptions::default(),
        x_t,
        &mut generator,
        &mut pipeline::no_callback,
    )?;
    let images = image_io::to_images(&x0)?;
    let grid = image_io::make_grid(&images, Some(4), 2)?;
    let size = trainer.config().unet.sample_size.map_or(32, |s| s.0) as u32;
    let grid = image_io::upscale_nearest(&grid, (128 / size).max(1))?;
    let path = dir.join("samples").join(format!("step_{step:06}.png"));
    image_io::save_png(&grid, &path)?;
    Ok(())
}
