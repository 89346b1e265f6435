//! Model folders in diffusers' layouts -> `UNet2DConfig` + `UNet2DModel`, from safetensors (mmapped,
//! single or sharded) or a PyTorch `.bin` read as data, renaming legacy attention weights as
//! diffusers' `ModelMixin._fix_state_dict_keys_on_load` does (diffusers 0.42 `models/modeling_utils.py`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::{BufferedSafetensors, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::unet::{UNet2DConfig, UNet2DModel};
use crate::{Error, Result, WeightProblem};

/// The UNet config file name.
pub const CONFIG_NAME: &str = "config.json";
/// Single-file safetensors weights.
pub const SAFETENSORS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// The index of sharded safetensors weights.
pub const SAFETENSORS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";
/// PyTorch pickle weights (older checkpoints).
pub const PYTORCH_NAME: &str = "diffusion_pytorch_model.bin";
/// The scheduler config file name.
pub const SCHEDULER_CONFIG_NAME: &str = "scheduler_config.json";
/// The file that marks a diffusers pipeline folder.
pub const MODEL_INDEX_NAME: &str = "model_index.json";

/// Where the weights of a UNet are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// `diffusion_pytorch_model.safetensors`, memory-mapped.
    Safetensors(PathBuf),
    /// `diffusion_pytorch_model.safetensors.index.json` and the shards it names.
    ShardedSafetensors {
        /// The index file.
        index: PathBuf,
        /// The shard files, in name order.
        shards: Vec<PathBuf>,
    },
    /// `diffusion_pytorch_model.bin`, a PyTorch zip pickle, read as data (nothing is executed).
    PyTorch(PathBuf),
}

impl WeightFiles {
    /// The file to name in messages: the single file, or the index of a sharded checkpoint.
    pub fn path(&self) -> &Path {
        match self {
            WeightFiles::Safetensors(p) | WeightFiles::PyTorch(p) => p,
            WeightFiles::ShardedSafetensors { index, .. } => index,
        }
    }
}

/// The files of a UNet found in a model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetFiles {
    /// The unet `config.json`.
    pub config: PathBuf,
    /// The weights.
    pub weights: WeightFiles,
    /// The folder's `scheduler_config.json`, if it has one.
    pub scheduler_config: Option<PathBuf>,
}

/// Finds the UNet config, weights and scheduler config in `dir`, which may be
/// - a diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`),
/// - a bare unet folder (`config.json` + weights; the scheduler is looked for in `../scheduler/`
///   when the parent is a pipeline folder), or
/// - a flat folder with `config.json`, weights and `scheduler_config.json` side by side
///   (like google/ddpm-cifar10-32).
///
/// Weights are looked for in diffusers' order of preference: safetensors, sharded safetensors,
/// then `.bin`.
pub fn find_unet_files(dir: &Path) -> Result<UNetFiles> {
    if !dir.is_dir() {
        return Err(Error::ModelFileNotFound {
            path: dir.to_path_buf(),
            what: "model folder".into(),
            looked_for: "a directory".into(),
        });
    }
    let unet_dir = if dir.join("unet").join(CONFIG_NAME).is_file() {
        dir.join("unet")
    } else {
        dir.to_path_buf()
    };
    let config = unet_dir.join(CONFIG_NAME);
    if !config.is_file() {
        return Err(Error::ModelFileNotFound {
            path: dir.to_path_buf(),
            what: "UNet config".into(),
            looked_for: format!("unet/{CONFIG_NAME} or {CONFIG_NAME}"),
        });
    }
    let weights = find_weights(&unet_dir)?;

    let mut candidates = vec![
        dir.join("scheduler").join(SCHEDULER_CONFIG_NAME),
        dir.join(SCHEDULER_CONFIG_NAME),
    ];
    if let Some(parent) = dir.parent().filter(|p| p.join(MODEL_INDEX_NAME).is_file()) {
        candidates.push(parent.join("scheduler").join(SCHEDULER_CONFIG_NAME));
    }
    let scheduler_config = candidates.into_iter().find(|p| p.is_file());
    Ok(UNetFiles {
        config,
        weights,
        scheduler_config,
    })
}

/// The weights in `unet_dir`, in diffusers' order of preference.
fn find_weights(unet_dir: &Path) -> Result<WeightFiles> {
    let single = unet_dir.join(SAFETENSORS_NAME);
    if single.is_file() {
        return Ok(WeightFiles::Safetensors(single));
    }
    let index = unet_dir.join(SAFETENSORS_INDEX_NAME);
    if index.is_file() {
        let shards = shard_files(&index, unet_dir)?;
        return Ok(WeightFiles::ShardedSafetensors { index, shards });
    }
    let bin = unet_dir.join(PYTORCH_NAME);
    if bin.is_file() {
        return Ok(WeightFiles::PyTorch(bin));
    }
    Err(Error::ModelFileNotFound {
        path: unet_dir.to_path_buf(),
        what: "UNet weights".into(),
        looked_for: format!("{SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}"),
    })
}

/// The shard files named by the `weight_map` of a safetensors index, which must be plain file
/// names in the index's folder.
fn shard_files(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let names: std::collections::BTreeSet<&String> = parsed.weight_map.values().collect();
    let mut shards = Vec::with_capacity(names.len());
    for name in names {
        let plain = Path::new(name)
            .file_name()
            .is_some_and(|f| f == name.as_str());
        if !plain {
            return Err(Error::config(
                "weight_map",
                format!("\"{name}\""),
                format!(
                    "shards in {} must be file names in the same folder",
                    index.display()
                ),
            ));
        }
        let shard = dir.join(name);
        if !shard.is_file() {
            return Err(Error::ModelFileNotFound {
                path: dir.to_path_buf(),
                what: "weight shard".into(),
                looked_for: name.clone(),
            });
        }
        shards.push(shard);
    }
    Ok(shards)
}

/// A UNet loaded from a model folder.
#[derive(Debug)]
pub struct LoadedUNet {
    /// The parsed unet config.
    pub config: UNet2DConfig,
    /// The model with its weights.
    pub model: UNet2DModel,
    /// Keys of `config.json` this crate does not know (for a warning); `_`-keys are not listed.
    pub unknown_config_keys: Vec<String>,
    /// Where the config, weights and scheduler config were found.
    pub files: UNetFiles,
    /// Weights holding NaN or infinite values (for a warning: such a model samples NaN), in the
    /// order the model asked for them.
    pub non_finite_tensors: Vec<String>,
}

impl LoadedUNet {
    /// The folder's `scheduler_config.json`, if it has one.
    pub fn scheduler_config(&self) -> Option<&Path> {
        self.files.scheduler_config.as_deref()
    }
}

/// Loads the UNet of a model folder (see [`find_unet_files`] for the layouts) in `dtype` on `device`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
///
/// // A tiny model from this crate's test fixtures; any diffusers UNet2DModel folder works.
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/unet/multi_head_sharded");
/// let unet = ddim::loader::load_unet(std::path::Path::new(dir), DType::F32, &Device::Cpu)?;
/// for key in &unet.unknown_config_keys {
///     eprintln!("warning: unknown unet config key `{key}`");
/// }
/// let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
/// let eps = unet.model.forward(&x, &Tensor::new(10u32, &Device::Cpu)?, None)?;
/// assert_eq!(eps.dims(), &[1, 3, 8, 8]);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn load_unet(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedUNet> {
    let files = find_unet_files(dir)?;
    let (config, unknown_config_keys) = UNet2DConfig::from_file(&files.config)?;
    let store = open_store(&files.weights)?;
    let (model, non_finite_tensors) =
        build_checked(&config, store, files.weights.path(), dtype, device)?;
    Ok(LoadedUNet {
        config,
        model,
        unknown_config_keys,
        files,
        non_finite_tensors,
    })
}

/// Builds a [`UNet2DModel`] for `config` from `weights`, checking that every tensor the config
/// needs is there with the right shape and that the file holds no other tensor. Legacy attention
/// names (`query`, `key`, `value`, `proj_attn`) are read as `to_q`, `to_k`, `to_v`, `to_out.0`.
/// Weights stored in another float dtype are converted to `dtype`. ([`load_unet`] also reports
/// weights that hold NaN or infinite values.)
pub fn load_unet_weights(
    config: &UNet2DConfig,
    weights: &WeightFiles,
    dtype: DType,
    device: &Device,
) -> Result<UNet2DModel> {
    let store = open_store(weights)?;
    Ok(build_checked(config, store, weights.path(), dtype, device)?.0)
}

fn open_store(weights: &WeightFiles) -> Result<Store> {
    let path = weights.path();
    Ok(match weights {
        // SAFETY: the file is mapped read-only and only while the tensors are read (`load`
        // copies each tensor out of the mapping); as with any mmap, the file must not be
        // truncated or rewritten by another process during that time.
        WeightFiles::Safetensors(_) => Store::Safetensors(
            unsafe { MmapedSafetensors::new(path) }.map_err(|e| bad_weights(path, e))?,
        ),
        // SAFETY: as above, for every shard.
        WeightFiles::ShardedSafetensors { shards, .. } => Store::Safetensors(
            unsafe { MmapedSafetensors::multi(shards) }.map_err(|e| bad_weights(path, e))?,
        ),
        WeightFiles::PyTorch(_) => {
            crate::pth::check_pth(path)?;
            Store::PyTorch(PthTensors::new(path, None).map_err(|e| bad_weights(path, e))?)
        }
    })
}

/// A candle error from opening a weights file as [`Error::BadWeights`], naming the file candle
/// names (a shard) or `path`, without candle's path prefix and backtrace.
fn bad_weights(path: &Path, mut e: candle_core::Error) -> Error {
    let mut path = path.to_path_buf();
    loop {
        e = match e {
            candle_core::Error::WithPath { inner, path: p } => {
                path = p;
                *inner
            }
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            candle_core::Error::Io(source) => return Error::Io { path, source },
            other => {
                return Error::BadWeights {
                    path,
                    reason: other.to_string(),
                }
            }
        }
    }
}

/// Checks that a UNet can run in `dtype` on `device` before anything is loaded: f32, f16 and
/// f64 anywhere, bf16 only on CUDA or Metal (candle has no bf16 matrix product on the CPU, so a
/// bf16 model there would only fail at its first forward pass), integer dtypes nowhere. The
/// loaders below call it; a caller that downloads weights first can call it earlier.
pub fn check_dtype(dtype: DType, device: &Device) -> Result<()> {
    let allowed = match dtype {
        DType::F32 | DType::F16 | DType::F64 => return Ok(()),
        DType::BF16 if !device.is_cpu() => return Ok(()),
        DType::BF16 => {
            "bf16 needs a CUDA or Metal device: candle has no bf16 matrix product on the CPU; \
             there load the model in f32 and call its use_bf16_products() (CPUs with \
             AVX512-BF16: bf16 products in the convolutions), or use f16"
        }
        _ => "a float dtype: f32, f16, bf16 (CUDA or Metal) or f64",
    };
    Err(Error::InvalidArgument {
        name: "dtype".into(),
        value: dtype.as_str().into(),
        allowed: allowed.into(),
    })
}

/// Builds the model from `store`, listing every missing, unexpected or misshapen tensor (named
/// after `path`) in one error; also returns the names of tensors holding NaN or infinities.
fn build_checked(
    config: &UNet2DConfig,
    store: Store,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(UNet2DModel, Vec<String>)> {
    check_dtype(dtype, device)?;
    let checked = CheckedStore::new(store)?;
    let log = checked.log.clone();
    let stored = checked.tensors.clone();
    let vb = VarBuilder::from_backend(Box::new(checked), dtype, device.clone());
    let model = UNet2DModel::new(config, vb);

    let log = log.lock().map_err(|_| poisoned())?;
    let mut problems = log.problems.clone();
    let mut unexpected: Vec<WeightProblem> = stored
        .iter()
        .filter(|(name, _)| !log.used.contains(*name))
        .map(|(_, (stored_name, shape))| WeightProblem::Unexpected {
            name: stored_name.clone(),
            shape: shape.clone(),
        })
        .collect();
    unexpected.sort_by_key(|p| p.to_string());
    problems.extend(unexpected);
    if !problems.is_empty() {
        return Err(Error::WeightMismatch {
            path: path.to_path_buf(),
            problems,
        });
    }
    Ok((model?, log.non_finite.clone()))
}

/// Builds a [`UNet2DModel`] from a config JSON text and the bytes of a safetensors file held in
/// memory (a model embedded in a binary), with the same checks as [`load_unet_weights`];
/// `name` stands for the weights in messages.
pub fn load_unet_from_bytes(
    config_json: &str,
    weights: Vec<u8>,
    name: &str,
    dtype: DType,
    device: &Device,
) -> Result<(UNet2DConfig, UNet2DModel)> {
    let (config, _) = UNet2DConfig::from_json_str(config_json)?;
    let store = Store::Buffered(
        BufferedSafetensors::new(weights).map_err(|e| bad_weights(Path::new(name), e))?,
    );
    let (model, _) = build_checked(&config, store, Path::new(name), dtype, device)?;
    Ok((config, model))
}

/// Writes a diffusers pipeline folder, each file atomically: `model_index.json`,
/// `unet/config.json`, `unet/diffusion_pytorch_model.safetensors` (the `tensors` as given, any
/// dtype) and `scheduler/scheduler_config.json` written as a `kind` scheduler
/// (`DDPMPipeline` for DDPM configs, else `DDIMPipeline`). `DDIMPipeline.from_pretrained` and
/// [`load_unet`] read the result.
pub fn save_pipeline_folder(
    dir: &Path,
    unet_config: &UNet2DConfig,
    tensors: &[(String, Tensor)],
    scheduler_config: &crate::scheduler::SchedulerConfig,
    kind: crate::scheduler::SchedulerKind,
) -> Result<()> {
    use std::io::Write as _;
    let weights = dir.join("unet").join(SAFETENSORS_NAME);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| {
        Error::argument(
            "weights",
            weights.display(),
            format!("serialisable tensors ({e})"),
        )
    })?;
    crate::atomic::write_atomically(&weights, |w| w.write_all(&bytes))?;
    let json = |path: PathBuf, value: serde_json::Value| -> Result<()> {
        let mut text = serde_json::to_string_pretty(&value).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        text.push('\n');
        crate::atomic::write_atomically(&path, |w| w.write_all(text.as_bytes()))
    };
    json(dir.join("unet").join(CONFIG_NAME), unet_config.to_json())?;
    json(
        dir.join("scheduler").join(SCHEDULER_CONFIG_NAME),
        scheduler_config.to_json(kind),
    )?;
    let (pipeline, scheduler) = match kind {
        crate::scheduler::SchedulerKind::Ddpm => ("DDPMPipeline", "DDPMScheduler"),
        _ => ("DDIMPipeline", "DDIMScheduler"),
    };
    json(
        dir.join(MODEL_INDEX_NAME),
        serde_json::json!({
            "_class_name": pipeline,
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", scheduler],
            "unet": ["diffusers", "UNet2DModel"],
        }),
    )
}

/// Every tensor of a UNet's weights under its diffusers name (legacy attention names renamed),
/// on the CPU in the stored dtype.
pub fn read_unet_tensors(weights: &WeightFiles) -> Result<Vec<(String, Tensor)>> {
    let store = open_store(weights)?;
    let mut out = Vec::new();
    for (name, _) in store.shapes()? {
        let tensor = store.load(&name, &Device::Cpu)?;
        out.push((diffusers_tensor_name(&name), tensor));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The diffusers name of a stored tensor: `<...>.attentions.<i>.{query,key,value,proj_attn}.<p>`
/// becomes `<...>.attentions.<i>.{to_q,to_k,to_v,to_out.0}.<p>`; other names are unchanged.
pub fn diffusers_tensor_name(stored: &str) -> String {
    let parts: Vec<&str> = stored.split('.').collect();
    let n = parts.len();
    if n >= 4
        && parts[n - 4] == "attentions"
        && parts[n - 3].parse::<usize>().is_ok()
        && matches!(parts[n - 1], "weight" | "bias")
    {
        let renamed = match parts[n - 2] {
            "query" => Some("to_q"),
            "key" => Some("to_k"),
            "value" => Some("to_v"),
            "proj_attn" => Some("to_out.0"),
            _ => None,
        };
        if let Some(renamed) = renamed {
            return format!("{}.{renamed}.{}", parts[..n - 2].join("."), parts[n - 1]);
        }
    }
    stored.to_string()
}

/// The tensors of a weights file.
enum Store {
    Safetensors(MmapedSafetensors),
    Buffered(BufferedSafetensors),
    PyTorch(PthTensors),
}

impl Store {
    /// (name in the file, shape) of every tensor, read from the headers only.
    fn shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(match self {
            Store::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect(),
            Store::Buffered(st) => st
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect(),
            Store::PyTorch(pth) => pth
                .tensor_infos()
                .iter()
                .map(|(name, info)| (name.clone(), info.layout.dims().to_vec()))
                .collect(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Store::Safetensors(st) => st.load(name, device),
            Store::Buffered(st) => st.load(name, device),
            Store::PyTorch(pth) => pth
                .get(name)?
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?
                .to_device(device),
        }
    }
}

/// What happened while the model took its weights.
#[derive(Default)]
struct Log {
    /// diffusers names that were asked for and found.
    used: HashSet<String>,
    /// Missing tensors and wrong shapes, in the order the model asked for them.
    problems: Vec<WeightProblem>,
    /// Tensors holding NaN or infinite values.
    non_finite: Vec<String>,
}

/// A `VarBuilder` backend that serves diffusers names from a [`Store`] and records, instead of
/// failing on, missing tensors and wrong shapes, so that one error can list every problem.
struct CheckedStore {
    store: Store,
    /// diffusers name -> (name in the file, shape).
    tensors: HashMap<String, (String, Vec<usize>)>,
    log: Arc<Mutex<Log>>,
}

fn poisoned() -> Error {
    Error::Candle(candle_core::Error::Msg(
        "weight loading log poisoned by a panic".into(),
    ))
}

impl CheckedStore {
    fn new(store: Store) -> Result<Self> {
        let mut shapes = store.shapes()?;
        // Names already in diffusers' form first, so a legacy duplicate is the one left unused.
        shapes.sort_by_key(|(name, _)| diffusers_tensor_name(name) != *name);
        let mut tensors = HashMap::with_capacity(shapes.len());
        let mut duplicates = 0usize;
        for (name, shape) in shapes {
            let key = diffusers_tensor_name(&name);
            if tensors.contains_key(&key) {
                // Keep it reachable for the "unexpected" report under a name no layer asks for.
                duplicates += 1;
                tensors.insert(format!("{name}#duplicate{duplicates}"), (name, shape));
            } else {
                tensors.insert(key, (name, shape));
            }
        }
        Ok(Self {
            store,
            tensors,
            log: Arc::new(Mutex::new(Log::default())),
        })
    }
}

impl SimpleBackend for CheckedStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let problem = match self.tensors.get(name) {
            None => Some(WeightProblem::Missing {
                name: name.to_string(),
                expected: s.dims().to_vec(),
            }),
            Some((_, shape)) if shape.as_slice() != s.dims() => Some(WeightProblem::WrongShape {
                name: name.to_string(),
                expected: s.dims().to_vec(),
                found: shape.clone(),
            }),
            Some(_) => None,
        };
        {
            let mut log = self
                .log
                .lock()
                .map_err(|_| candle_core::Error::Msg("weight loading log poisoned".into()))?;
            if self.tensors.contains_key(name) {
                log.used.insert(name.to_string());
            }
            if let Some(problem) = problem {
                log.problems.push(problem);
                // A placeholder so the model can finish building and every problem gets listed:
                // one zero broadcast to the shape, so a config asking for huge tensors allocates
                // nothing.
                return Tensor::zeros((), dtype, dev)?.broadcast_as(s);
            }
        }
        let tensor = self.get_unchecked(name, dtype, dev)?;
        // One pass: a sum is finite exactly when no value is NaN or infinite (a float32 sum of
        // finite weights does not overflow).
        let sum = tensor.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite() {
            self.log
                .lock()
                .map_err(|_| candle_core::Error::Msg("weight loading log poisoned".into()))?
                .non_finite
                .push(name.to_string());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (stored, _) =
            self.tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        self.store.load(stored, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_attention_names() {
        let cases = [
            (
                "mid_block.attentions.0.query.weight",
                "mid_block.attentions.0.to_q.weight",
            ),
            (
                "down_blocks.1.attentions.1.key.bias",
                "down_blocks.1.attentions.1.to_k.bias",
            ),
            (
                "up_blocks.0.attentions.2.value.weight",
                "up_blocks.0.attentions.2.to_v.weight",
            ),
            (
                "mid_block.attentions.0.proj_attn.bias",
                "mid_block.attentions.0.to_out.0.bias",
            ),
            (
                "mid_block.attentions.0.group_norm.weight",
                "mid_block.attentions.0.group_norm.weight",
            ),
            (
                "down_blocks.0.resnets.0.conv1.weight",
                "down_blocks.0.resnets.0.conv1.weight",
            ),
            ("query.weight", "query.weight"),
        ];
        for (stored, expected) in cases {
            assert_eq!(diffusers_tensor_name(stored), expected);
        }
    }
}
