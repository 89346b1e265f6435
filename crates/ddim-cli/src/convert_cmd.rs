//! `ddim convert`: rewrites a model (any layout `ddim` reads, `.bin` included) as a diffusers
//! pipeline folder with safetensors weights in the chosen dtype.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use ddim::scheduler::SchedulerKind;

use crate::common::{self, DTypeArg, ModelArgs};
use crate::UsageError;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The new pipeline folder.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
    /// The dtype of the written weights (f16 halves the size; ddim and diffusers compute in
    /// f32 after loading unless told otherwise).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Replace a model already in --output.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let index = args.output.join(ddim::loader::MODEL_INDEX_NAME);
    if index.exists() && !args.overwrite {
        return Err(UsageError(format!(
            "--output {} already holds a model; pass --overwrite to replace it",
            args.output.display()
        ))
        .into());
    }
    // Loading checks that config and weights agree.
    let model = common::load_model(&args.model, None, DType::F32)?;
    model.check_scheduler_class()?;
    let tensors = match &model.files {
        Some(files) => ddim::loader::read_unet_tensors(&files.weights)
            .with_context(|| format!("reading {}", files.weights.path().display()))?,
        None => {
            let st = candle_core::safetensors::load_buffer(
                common::builtin::WEIGHTS,
                &candle_core::Device::Cpu,
            )?;
            let mut v: Vec<_> = st.into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        }
    };
    let dtype = args.dtype.dtype();
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    // An inverse scheduler config is saved as the DDIM sampler it inverts.
    let kind = match model.scheduler_config.kind() {
        Some(SchedulerKind::DdimInverse) => SchedulerKind::Ddim,
        Some(kind) => kind,
        None => SchedulerKind::Ddpm,
    };
    ddim::loader::save_pipeline_folder(
        &args.output,
        &model.config,
        &tensors,
        &model.scheduler_config,
        kind,
    )?;
    say!(
        "wrote {} ({} tensors, {:?}) from {}",
        args.output.display(),
        tensors.len(),
        dtype,
        model.source
    );
    Ok(())
}
