//! Checkpoints: the EMA model in diffusers' pipeline layout (what `DDIMPipeline.from_pretrained`
//! and `ddim sample --model` load) and the full training state for `--resume`, each file written
//! atomically (a temporary file renamed over the old one), so an interrupted save never destroys
//! the previous checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::Device;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::{Moments, TrainConfig, Trainer};
use crate::atomic::write_atomically;
use crate::scheduler::SchedulerKind;
use crate::{Error, Result};

/// The training state file: raw weights, AdamW moments, EMA weights and the loss of every step,
/// with the step count and the run's config in the safetensors metadata.
pub const STATE_NAME: &str = "training_state.safetensors";
const STATE_FORMAT: &str = "ddim-training-state-v1";

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::argument("tensor", name, format!("a valid tensor ({e})")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| {
        Error::argument("checkpoint", path.display(), format!("serialisable ({e})"))
    })?;
    write_atomically(path, |w| w.write_all(&bytes))
}

/// Writes the EMA model as a diffusers pipeline folder: `model_index.json` (`DDPMPipeline`),
/// `unet/config.json`, `unet/diffusion_pytorch_model.safetensors` (f32) and
/// `scheduler/scheduler_config.json` (`DDPMScheduler`, the training schedule).
pub fn save_pipeline(trainer: &Trainer, dir: &Path) -> Result<()> {
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        trainer.ema_tensors()?.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let config = trainer.config();
    crate::loader::save_pipeline_folder(
        dir,
        &config.unet,
        &tensors,
        &config.scheduler,
        SchedulerKind::Ddpm,
    )
}

/// Writes `dir/training_state.safetensors`.
pub fn save_state(trainer: &Trainer, dir: &Path) -> Result<()> {
    let (names, vars, params, moments, ema) = trainer.parts();
    let mut tensors = Vec::with_capacity(4 * names.len() + 1);
    for (i, (name, var)) in names.iter().zip(vars).enumerate() {
        let shape = var.dims().to_vec();
        tensors.push((
            format!("param/{name}"),
            shape.clone(),
            f32_bytes(&params[i]),
        ));
        tensors.push((
            format!("adam_m/{name}"),
            shape.clone(),
            f32_bytes(&moments[i].m),
        ));
        tensors.push((
            format!("adam_v/{name}"),
            shape.clone(),
            f32_bytes(&moments[i].v),
        ));
        tensors.push((format!("ema/{name}"), shape, f32_bytes(&ema[i])));
    }
    let losses = trainer.losses();
    tensors.push(("loss_history".into(), vec![losses.len()], f32_bytes(losses)));
    let meta = HashMap::from([
        ("format".to_string(), STATE_FORMAT.to_string()),
        ("step".to_string(), trainer.step_count().to_string()),
        ("config".to_string(), trainer.config().to_json().to_string()),
    ]);
    write_safetensors(&dir.join(STATE_NAME), tensors, Some(meta))
}

/// Restores a [`Trainer`] from `dir/training_state.safetensors`.
pub fn load_state(dir: &Path, device: &Device) -> Result<Trainer> {
    let path = dir.join(STATE_NAME);
    let bad = |reason: String| {
        Error::argument(
            "resume",
            path.display(),
            format!("a training state written by `ddim train` ({reason})"),
        )
    };
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("no metadata".into()))?;
    if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
        return Err(bad(format!("format is not {STATE_FORMAT}")));
    }
    let config_json: serde_json::Value =
        serde_json::from_str(meta.get("config").ok_or_else(|| bad("no config".into()))?)
            .map_err(|e| bad(e.to_string()))?;
    let config = TrainConfig::from_json(&config_json)?;
    let step: usize = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no step".into()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let read = |name: &str, len: usize| -> Result<Vec<f32>> {
        let view = st
            .tensor(name)
            .map_err(|_| bad(format!("tensor {name} is missing")))?;
        if view.dtype() != Dtype::F32 || view.data().len() != 4 * len {
            return Err(bad(format!(
                "tensor {name} has shape {:?}, expected {len} f32 values",
                view.shape()
            )));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut trainer = Trainer::new(config, device)?;
    let (names, vars, ..) = trainer.parts();
    let sizes: Vec<(String, usize)> = names
        .iter()
        .zip(vars)
        .map(|(n, v)| (n.clone(), v.elem_count()))
        .collect();
    let mut params = Vec::with_capacity(sizes.len());
    let mut moments = Vec::with_capacity(sizes.len());
    let mut ema = Vec::with_capacity(sizes.len());
    for (name, n) in &sizes {
        params.push(read(&format!("param/{name}"), *n)?);
        moments.push(Moments {
            m: read(&format!("adam_m/{name}"), *n)?,
            v: read(&format!("adam_v/{name}"), *n)?,
        });
        ema.push(read(&format!("ema/{name}"), *n)?);
    }
    let losses = read("loss_history", step)?;
    trainer.restore(params, moments, ema, losses)?;
    Ok(trainer)
}
