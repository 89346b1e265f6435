//! `ddim inspect`: what a model folder holds and what `ddim sample` would run on it.

use anyhow::{Context, Result};
use clap::Args;
use ddim::loader::WeightFiles;
use ddim::scheduler::SchedulerKind;

use crate::common::{self, ModelArgs};

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The inference steps to show the schedule for.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
}

/// The number of parameters stored in the weight files (read from their headers).
fn stored_parameters(weights: &WeightFiles) -> Result<usize> {
    let count_st = |paths: &[&std::path::Path]| -> Result<usize> {
        let mut total = 0usize;
        for path in paths {
            // SAFETY: the file is mapped read-only for the duration of this count; ddim never
            // writes weight files it reads, and a concurrent writer would only corrupt the count.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .with_context(|| format!("reading {}", path.display()))?;
            total += st
                .tensors()
                .iter()
                .map(|(_, view)| view.shape().iter().product::<usize>())
                .sum::<usize>();
        }
        Ok(total)
    };
    match weights {
        WeightFiles::Safetensors(p) => count_st(&[p.as_path()]),
        WeightFiles::ShardedSafetensors { shards, .. } => {
            count_st(&shards.iter().map(|p| p.as_path()).collect::<Vec<_>>())
        }
        WeightFiles::PyTorch(p) => {
            let infos = candle_core::pickle::read_pth_tensor_info(p, false, None)
                .with_context(|| format!("reading {}", p.display()))?;
            Ok(infos.iter().map(|i| i.layout.shape().elem_count()).sum())
        }
    }
}

fn builtin_parameters() -> Result<usize> {
    let st = safetensors::SafeTensors::deserialize(common::builtin::WEIGHTS)
        .context("reading the built-in weights")?;
    Ok(st
        .tensors()
        .iter()
        .map(|(_, v)| v.shape().iter().product::<usize>())
        .sum())
}

pub fn run(args: InspectArgs) -> Result<()> {
    let model = common::load_model(&args.model, None, candle_core::DType::F32)?;
    let params = match &model.files {
        Some(files) => {
            say!("model folder: {}", model.source);
            say!("  unet config: {}", files.config.display());
            say!("  weights:     {}", files.weights.path().display());
            match &files.scheduler_config {
                Some(p) => say!("  scheduler:   {}", p.display()),
                None => say!("  scheduler:   (none; diffusers' defaults)"),
            }
            stored_parameters(&files.weights)?
        }
        None => {
            say!("model: {} (in the binary)", model.source);
            builtin_parameters()?
        }
    };
    say!("parameters: {params} ({:.1} M)", params as f64 / 1e6);
    say!(
        "unet config:\n{}",
        serde_json::to_string_pretty(&model.config.to_json())?
    );
    let cfg = &model.scheduler_config;
    say!(
        "scheduler config ({}):\n{}",
        cfg.class_name.as_deref().unwrap_or("no _class_name"),
        serde_json::to_string_pretty(&cfg.to_json(cfg.kind().unwrap_or(SchedulerKind::Ddpm)))?
    );
    if let Err(refused) = model.check_scheduler_class() {
        say!("sample would refuse this model: {refused}");
        return Ok(());
    }
    print_sampler(&model, args.steps)
}

/// The sampler `ddim sample` runs on the model (the folder chooses: DDIM for DDPM/DDIM configs,
/// as DDIMPipeline does) and its timesteps.
fn print_sampler(model: &common::Model, steps: usize) -> Result<()> {
    let (kind, cfg) =
        common::SamplerChoice::parse(None, false, &[])?.resolve(&model.scheduler_config)?;
    let s = ddim::scheduler::build(&cfg, kind, steps, Default::default())?;
    let ts: Vec<String> = s
        .model_timesteps()
        .iter()
        .map(|t| {
            if t.fract() == 0.0 {
                format!("{t:.0}")
            } else {
                format!("{t:.3}")
            }
        })
        .collect();
    let shown: Vec<String> = if ts.len() > 12 {
        ts[..6]
            .iter()
            .cloned()
            .chain(std::iter::once("...".to_string()))
            .chain(ts[ts.len() - 3..].iter().cloned())
            .collect()
    } else {
        ts.clone()
    };
    let shape = ddim::pipeline::noise_shape(&model.unet, 1)?;
    say!(
        "`ddim sample` runs: {}, {} steps{}, spacing {}, {} prediction, on {:?}\n  images {}x{}x{}; timesteps [{}]",
        if kind == SchedulerKind::Ddim { "DDIM" } else { kind.class_name() },
        steps,
        if kind == SchedulerKind::Ddim { ", eta 0" } else { "" },
        cfg.timestep_spacing,
        cfg.prediction_type,
        model.device,
        shape[1],
        shape[2],
        shape[3],
        shown.join(", ")
    );
    Ok(())
}
