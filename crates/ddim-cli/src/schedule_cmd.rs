//! `ddim schedule`: the timesteps, ᾱ and σ of a scheduler config (or, for the sigma-based
//! samplers, their model timesteps and sigmas), for checking a schedule against a paper or
//! against diffusers before sampling.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ddim::scheduler::{
    DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DdimStepOptions, PredictionType,
    SchedulerConfig, SchedulerKind, TimestepSpacing,
};

use crate::common::{self, SamplerChoice};

/// Which scheduler's schedule to print.
#[derive(Clone, Copy, Debug)]
enum Which {
    Ddim,
    Ddpm,
    DdimInverse,
    /// Any other sampler: its model timesteps and sigmas.
    Other(SchedulerKind),
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// A diffusers `scheduler_config.json` (default: diffusers' DDIMScheduler defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The scheduler: ddim, ddpm, ddim-inverse, or any sampler `ddim sample --scheduler` takes
    /// (dpm++2m, unipc, euler, ..., or a diffusers class name); the config is converted to it
    /// as diffusers' `from_config` does.
    #[arg(long, default_value = "ddim", value_name = "NAME")]
    scheduler: String,
    /// Karras et al. (2022) sigmas, for the samplers that have them (use_karras_sigmas).
    #[arg(long)]
    karras_sigmas: bool,
    /// Sets a key of the scheduler's config (repeatable; VALUE is read as JSON, or else as a
    /// string).
    #[arg(long, value_name = "KEY=VALUE")]
    scheduler_option: Vec<String>,
    /// The number of inference steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Overrides the config's `timestep_spacing` (leading, trailing, linspace, quad).
    #[arg(long, value_name = "SPACING")]
    timestep_spacing: Option<String>,
    /// DDIM's η, for the σ_t column.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    eta: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the config as the chosen scheduler's diffusers `scheduler_config.json`
    /// (e.g. a DDPM config converted to DDIM, as `DDIMScheduler.from_config` does).
    #[arg(long, value_name = "FILE.json")]
    save_config: Option<PathBuf>,
    /// Overwrite an existing --save-config file.
    #[arg(long)]
    overwrite: bool,
}

/// `ddim schedule`: print (or save) a scheduler's timesteps with ᾱ and σ at each.
pub fn run(args: ScheduleArgs) -> Result<()> {
    let (which, config) = resolve(&args)?;
    common::check_eta(args.eta)?;
    if let Some(path) = &args.save_config {
        common::refuse_existing(path, args.overwrite)?;
        let kind = which.kind();
        config.save(kind, path)?;
        eprintln!("wrote {} ({})", path.display(), kind.class_name());
    }
    if let Which::Other(kind) = which {
        return print_sigmas(&args, kind, &config);
    }
    let rows = rows(&args, which, &config)?;
    let other = match which {
        Which::DdimInverse => "from",
        _ => "next",
    };
    if args.json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|&(t, a, p, ap, sigma)| {
                serde_json::json!({"t": t, "alpha_bar": a, other: p, format!("alpha_bar_{other}"): ap, "sigma": sigma})
            })
            .collect();
        say!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        print_table(which, &config, &rows, other);
    }
    Ok(())
}

impl Which {
    fn kind(self) -> SchedulerKind {
        match self {
            Which::Ddim => SchedulerKind::Ddim,
            Which::Ddpm => SchedulerKind::Ddpm,
            Which::DdimInverse => SchedulerKind::DdimInverse,
            Which::Other(kind) => kind,
        }
    }
}

/// The scheduler `--scheduler` names and the config converted to it, options applied.
fn resolve(args: &ScheduleArgs) -> Result<(Which, SchedulerConfig)> {
    let config = read_config(args)?;
    let name = args.scheduler.as_str();
    if matches!(name, "ddim-inverse" | "DDIMInverseScheduler") {
        let choice = SamplerChoice::parse(None, args.karras_sigmas, &args.scheduler_option)?;
        let (_, config) = choice.resolve_as(&config, SchedulerKind::DdimInverse)?;
        return Ok((Which::DdimInverse, config));
    }
    let choice = SamplerChoice::parse(Some(name), args.karras_sigmas, &args.scheduler_option)?;
    let (kind, config) = choice.resolve(&config)?;
    let which = match kind {
        SchedulerKind::Ddim => Which::Ddim,
        SchedulerKind::Ddpm => Which::Ddpm,
        SchedulerKind::DdimInverse => Which::DdimInverse,
        other => Which::Other(other),
    };
    Ok((which, config))
}

/// A sigma-based (or multistep) sampler's schedule: each step's model timestep and sigma.
fn print_sigmas(args: &ScheduleArgs, kind: SchedulerKind, config: &SchedulerConfig) -> Result<()> {
    let s = ddim::scheduler::build(config, kind, args.steps, DdimStepOptions::default())?;
    let timesteps = s.model_timesteps();
    let sigmas = s.sigmas();
    let sigma = |i: usize| sigmas.as_ref().and_then(|v| v.get(i).copied());
    if args.json {
        let steps: Vec<serde_json::Value> = timesteps
            .iter()
            .enumerate()
            .map(|(i, &t)| serde_json::json!({"t": t, "sigma": sigma(i)}))
            .collect();
        let out = serde_json::json!({
            "scheduler": kind.class_name(),
            "init_noise_sigma": s.init_noise_sigma(),
            "steps": steps,
            "sigmas": sigmas,
        });
        say!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    say!(
        "# {}, {} model calls, spacing {}, init_noise_sigma {}",
        kind.class_name(),
        timesteps.len(),
        config.timestep_spacing,
        s.init_noise_sigma()
    );
    say!("{:>5} {:>12} {:>14}", "step", "t", "sigma");
    for (i, t) in timesteps.iter().enumerate() {
        let sg = sigma(i).map_or("-".to_string(), |v| format!("{v:.6}"));
        say!("{i:>5} {t:>12.4} {sg:>14}");
    }
    if let Some(v) = &sigmas {
        if v.len() > timesteps.len() {
            say!("final sigma {}", v[v.len() - 1]);
        }
    }
    Ok(())
}

/// `--config`, or diffusers' defaults, with `--timestep-spacing` applied.
fn read_config(args: &ScheduleArgs) -> Result<SchedulerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let loaded = SchedulerConfig::from_file(path)
                .with_context(|| format!("reading the scheduler config {}", path.display()))?;
            for key in &loaded.unknown_keys {
                eprintln!("warning: {}: unknown key `{key}` ignored", path.display());
            }
            loaded.config
        }
        None => SchedulerConfig::default(),
    };
    if let Some(s) = &args.timestep_spacing {
        config.timestep_spacing = TimestepSpacing::from_name(s)?;
    }
    Ok(config)
}

/// A step of the schedule: (t, ᾱ_t, the next timestep (inverse: the one it comes from), ᾱ
/// there, σ_t).
type Row = (usize, f32, Option<usize>, f32, f32);

/// Every step of the chosen scheduler.
fn rows(args: &ScheduleArgs, which: Which, config: &SchedulerConfig) -> Result<Vec<Row>> {
    Ok(match which {
        Which::Ddim => {
            let mut s = DDIMScheduler::new(config)?;
            s.set_timesteps(args.steps)?;
            let ac = s.alphas_cumprod();
            s.timesteps()
                .iter()
                .map(|&t| {
                    let prev = s.previous_timestep(t)?;
                    let a_prev = prev.map_or(s.final_alpha_cumprod(), |p| ac[p]);
                    let sigma = args.eta as f32 * s.variance(t, prev)?.sqrt();
                    Ok((t, ac[t], prev, a_prev, sigma))
                })
                .collect::<ddim::Result<_>>()?
        }
        Which::Ddpm => {
            let mut s = DDPMScheduler::new(config)?;
            s.set_timesteps(args.steps)?;
            let ac = s.alphas_cumprod();
            s.timesteps()
                .iter()
                .map(|&t| {
                    let prev = s.previous_timestep(t)?;
                    let a_prev = prev.map_or(1.0, |p| ac[p]);
                    let sigma = if t > 0 { s.variance(t)?.sqrt() } else { 0.0 };
                    Ok((t, ac[t], prev, a_prev, sigma))
                })
                .collect::<ddim::Result<_>>()?
        }
        Which::DdimInverse => {
            let mut s = DDIMInverseScheduler::new(config)?;
            s.set_timesteps(args.steps)?;
            let ac = s.alphas_cumprod();
            s.timesteps()
                .iter()
                .map(|&t| {
                    let from = s.start_timestep(t)?;
                    let a_from = from.map_or(s.initial_alpha_cumprod(), |p| ac[p]);
                    Ok((t, ac[t], from, a_from, 0.0))
                })
                .collect::<ddim::Result<_>>()?
        }
        Which::Other(_) => Vec::new(),
    })
}

/// The schedule as an aligned table.
fn print_table(which: Which, config: &SchedulerConfig, rows: &[Row], other: &str) {
    let pred = match config.prediction_type {
        PredictionType::Epsilon => "epsilon",
        PredictionType::Sample => "sample",
        PredictionType::VPrediction => "v_prediction",
    };
    say!(
        "# {:?}, {} steps, spacing {}, {} prediction, T = {}",
        which,
        rows.len(),
        config.timestep_spacing,
        pred,
        config.num_train_timesteps
    );
    say!(
        "{:>5} {:>6} {:>12} {:>6} {:>12} {:>10}",
        "step",
        "t",
        "alpha_bar",
        other,
        "alpha_bar'",
        "sigma"
    );
    for (i, (t, a, p, ap, sigma)) in rows.iter().enumerate() {
        let p = p.map_or("-".to_string(), |p| p.to_string());
        say!("{i:>5} {t:>6} {a:>12.8} {p:>6} {ap:>12.8} {sigma:>10.6}");
    }
}
