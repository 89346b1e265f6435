//! `ddim schedule`: the timesteps, ᾱ and σ of a scheduler config, for checking a schedule
//! against a paper or against diffusers before sampling.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use ddim::scheduler::{
    DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, PredictionType, SchedulerConfig,
    SchedulerKind, TimestepSpacing,
};

use crate::common;

/// Which scheduler's schedule to print.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Which {
    /// DDIM sampling (the default).
    Ddim,
    /// DDPM ancestral sampling.
    Ddpm,
    /// DDIM inversion (x_0 -> x_T).
    DdimInverse,
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// A diffusers `scheduler_config.json` (default: diffusers' DDIMScheduler defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The scheduler.
    #[arg(long, value_enum, default_value = "ddim")]
    scheduler: Which,
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
    let config = read_config(&args)?;
    common::check_eta(args.eta)?;
    if let Some(path) = &args.save_config {
        common::refuse_existing(path, args.overwrite)?;
        let kind = match args.scheduler {
            Which::Ddim => SchedulerKind::Ddim,
            Which::Ddpm => SchedulerKind::Ddpm,
            Which::DdimInverse => SchedulerKind::DdimInverse,
        };
        config.save(kind, path)?;
        eprintln!("wrote {} ({})", path.display(), kind.class_name());
    }
    let rows = rows(&args, &config)?;
    let other = match args.scheduler {
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
        print_table(&args, &config, &rows, other);
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
fn rows(args: &ScheduleArgs, config: &SchedulerConfig) -> Result<Vec<Row>> {
    Ok(match args.scheduler {
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
    })
}

/// The schedule as an aligned table.
fn print_table(args: &ScheduleArgs, config: &SchedulerConfig, rows: &[Row], other: &str) {
    let pred = match config.prediction_type {
        PredictionType::Epsilon => "epsilon",
        PredictionType::Sample => "sample",
        PredictionType::VPrediction => "v_prediction",
    };
    say!(
        "# {:?}, {} steps, spacing {}, {} prediction, T = {}",
        args.scheduler,
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
