//! `scheduler_config.json`: diffusers' exact keys and defaults (diffusers 0.42
//! `DDIMScheduler`, `DDPMScheduler`, `DDIMInverseScheduler`), legacy files, and writing back.

use std::path::Path;

use serde_json::{Map, Value};

use crate::schedule::{self, BetaSchedule};
use crate::{Error, Result};

/// What the model's output means (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε that was added (DDPM).
    Epsilon,
    /// The clean sample x_0.
    Sample,
    /// The velocity v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (Salimans & Ho 2022).
    VPrediction,
}

/// How inference timesteps are laid over the training timesteps (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `arange(N) · (T // N) + steps_offset` (DDIM's "uniform"; diffusers' default).
    Leading,
    /// `round(arange(T, 0, -T/N)) - 1`: always starts at T - 1 (Lin et al. 2023, Table 2).
    Trailing,
    /// `round(linspace(0, T - 1, N))`.
    Linspace,
    /// `int(linspace(0, sqrt(0.8 T), N)²)`, the official DDIM code's "quad" skip for CIFAR-10;
    /// repeated values (large N) are merged, since a step from t to the same t is the identity.
    Quad,
}

/// The variance of DDPM's ancestral step (`variance_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    /// The posterior variance β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t.
    FixedSmall,
    /// β̃_t, computed through its logarithm.
    FixedSmallLog,
    /// β_t (DDPM's σ² = β).
    FixedLarge,
    /// β_t, computed through its logarithm.
    FixedLargeLog,
    /// The model predicts the variance in its second C output channels.
    Learned,
    /// The model predicts v ∈ [-1, 1] interpolating log β̃_t and log β_t (Nichol & Dhariwal 2021, eq. 15).
    LearnedRange,
}

macro_rules! named_enum {
    ($ty:ident, $key:literal, $( $variant:ident => $name:literal ),+ $(,)?) => {
        impl $ty {
            /// The names accepted in `scheduler_config.json` (and on the command line).
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The diffusers name.
            pub fn name(self) -> &'static str {
                match self { $( $ty::$variant => $name ),+ }
            }

            /// Parses a diffusers name; the error lists the allowed names.
            pub fn from_name(name: &str) -> Result<Self> {
                match name {
                    $( $name => Ok($ty::$variant), )+
                    other => Err(Error::config(
                        $key,
                        format!("{other:?}"),
                        format!("allowed: {}", Self::NAMES.join(", ")),
                    )),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::from_name(s)
            }
        }
    };
}

named_enum!(PredictionType, "prediction_type",
    Epsilon => "epsilon", Sample => "sample", VPrediction => "v_prediction");
named_enum!(TimestepSpacing, "timestep_spacing",
    Leading => "leading", Trailing => "trailing", Linspace => "linspace", Quad => "quad");
named_enum!(VarianceType, "variance_type",
    FixedSmall => "fixed_small", FixedSmallLog => "fixed_small_log", FixedLarge => "fixed_large",
    FixedLargeLog => "fixed_large_log", Learned => "learned", LearnedRange => "learned_range");

/// Which diffusers scheduler class a config file names (`_class_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler` (also the legacy `GaussianDDPMScheduler`).
    Ddpm,
    /// `DDIMInverseScheduler`.
    DdimInverse,
}

impl SchedulerKind {
    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::DdimInverse => "DDIMInverseScheduler",
        }
    }

    /// The kind for a diffusers class name, if it is one we implement.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "DDPMScheduler" | "GaussianDDPMScheduler" => Some(SchedulerKind::Ddpm),
            "DDIMInverseScheduler" => Some(SchedulerKind::DdimInverse),
            _ => None,
        }
    }

    /// The config keys this diffusers class takes (what [`SchedulerConfig::to_json`] writes).
    fn keys(self) -> &'static [&'static str] {
        const COMMON: &[&str] = &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "clip_sample",
            "set_alpha_to_one",
            "steps_offset",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "rescale_betas_zero_snr",
        ];
        const DDPM: &[&str] = &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "variance_type",
            "clip_sample",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ];
        const INVERSE: &[&str] = &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "clip_sample",
            "set_alpha_to_one",
            "steps_offset",
            "prediction_type",
            "clip_sample_range",
            "timestep_spacing",
            "rescale_betas_zero_snr",
        ];
        match self {
            SchedulerKind::Ddim => COMMON,
            SchedulerKind::Ddpm => DDPM,
            SchedulerKind::DdimInverse => INVERSE,
        }
    }
}

/// Every key of diffusers' DDIM, DDPM and DDIM-inverse scheduler configs. Missing keys take
/// diffusers' defaults ([`SchedulerConfig::default`]); each scheduler reads the keys its diffusers
/// class has, so a DDPM config builds a DDIM scheduler as `DDIMScheduler.from_config` does.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`, when the file names one.
    pub class_name: Option<String>,
    /// T, the number of training timesteps.
    pub num_train_timesteps: usize,
    /// First beta of the `linear`/`scaled_linear`/`sigmoid` schedules.
    pub beta_start: f64,
    /// Last beta of the `linear`/`scaled_linear`/`sigmoid` schedules.
    pub beta_end: f64,
    /// The beta schedule (ignored when `trained_betas` is given).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, one per training timestep.
    pub trained_betas: Option<Vec<f64>>,
    /// DDPM only: the variance of the ancestral step.
    pub variance_type: VarianceType,
    /// Clip the predicted x_0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// See `clip_sample`.
    pub clip_sample_range: f64,
    /// DDIM: ᾱ after the last step is 1 (true) or ᾱ_0 (false). Inverse: ᾱ before the first step.
    pub set_alpha_to_one: bool,
    /// Added to every `leading` timestep (Stable Diffusion uses 1).
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of x_0 (Saharia et al. 2022, Imagen); replaces `clip_sample`.
    pub thresholding: bool,
    /// The quantile of |x_0| used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// The largest threshold of dynamic thresholding.
    pub sample_max_value: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults (identical for the three classes, `variance_type` being DDPM's).
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Keys of other schedulers' configs and of old diffusers versions that carry no meaning here
/// but are not worth a warning.
const SILENT_KEYS: &[&str] = &["timestep_values", "tensor_format"];

/// A parsed config with the keys that were not understood (for a warning).
#[derive(Clone, Debug)]
pub struct LoadedSchedulerConfig {
    /// The config.
    pub config: SchedulerConfig,
    /// Keys that no DDIM/DDPM/DDIM-inverse scheduler knows, in file order; they were ignored.
    pub unknown_keys: Vec<String>,
}

impl SchedulerConfig {
    /// The kind named by `_class_name`, if it is one we implement.
    pub fn kind(&self) -> Option<SchedulerKind> {
        self.class_name
            .as_deref()
            .and_then(SchedulerKind::from_class_name)
    }

    /// Reads a `scheduler_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<LoadedSchedulerConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = crate::json::parse(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&value).map_err(|e| match e {
            Error::InvalidConfig {
                key,
                value,
                allowed,
            } => Error::InvalidConfig {
                key: format!("{key}` in `{}", path.display()),
                value,
                allowed,
            },
            other => other,
        })
    }

    /// Parses a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<LoadedSchedulerConfig> {
        let value: Value = crate::json::parse(text).map_err(|e| {
            Error::config(
                "scheduler_config",
                "malformed JSON",
                format!("a JSON object is expected ({e})"),
            )
        })?;
        Self::from_json(&value)
    }

    /// Parses a config from a JSON value (an object of diffusers keys).
    pub fn from_json(value: &Value) -> Result<LoadedSchedulerConfig> {
        let obj = value.as_object().ok_or_else(|| {
            Error::config(
                "scheduler_config",
                short(value),
                "a JSON object of diffusers scheduler keys is expected",
            )
        })?;
        let mut cfg = SchedulerConfig::default();
        let mut unknown_keys = Vec::new();
        // The legacy `timesteps` key (GaussianDDPMScheduler) is T when `num_train_timesteps` is absent.
        if let Some(v) = obj
            .get("num_train_timesteps")
            .or_else(|| obj.get("timesteps"))
        {
            cfg.num_train_timesteps = get_usize("num_train_timesteps", v)?;
            check_train_timesteps(cfg.num_train_timesteps)?;
        }
        for (key, v) in obj {
            match key.as_str() {
                "_class_name" => cfg.class_name = v.as_str().map(str::to_string),
                k if k.starts_with('_') => {}
                "num_train_timesteps" | "timesteps" => {}
                "beta_start" => cfg.beta_start = get_f64(key, v)?,
                "beta_end" => cfg.beta_end = get_f64(key, v)?,
                "beta_schedule" => cfg.beta_schedule = BetaSchedule::from_name(get_str(key, v)?)?,
                "trained_betas" => {
                    cfg.trained_betas = match v {
                        Value::Null => None,
                        Value::Array(items) => Some(
                            items
                                .iter()
                                .map(|x| get_f64(key, x))
                                .collect::<Result<Vec<_>>>()?,
                        ),
                        other => {
                            return Err(Error::config(
                                key,
                                short(other),
                                "a list of numbers or null",
                            ))
                        }
                    }
                }
                "variance_type" => {
                    // diffusers writes `null` for "use the default"; legacy files may too.
                    if !v.is_null() {
                        cfg.variance_type = VarianceType::from_name(get_str(key, v)?)?
                    }
                }
                "clip_sample" => cfg.clip_sample = get_bool(key, v)?,
                "clip_sample_range" => cfg.clip_sample_range = get_f64(key, v)?,
                "set_alpha_to_one" => cfg.set_alpha_to_one = get_bool(key, v)?,
                "steps_offset" => cfg.steps_offset = get_usize(key, v)?,
                "prediction_type" => {
                    cfg.prediction_type = PredictionType::from_name(get_str(key, v)?)?
                }
                "thresholding" => cfg.thresholding = get_bool(key, v)?,
                "dynamic_thresholding_ratio" => cfg.dynamic_thresholding_ratio = get_f64(key, v)?,
                "sample_max_value" => cfg.sample_max_value = get_f64(key, v)?,
                "timestep_spacing" => {
                    cfg.timestep_spacing = TimestepSpacing::from_name(get_str(key, v)?)?
                }
                "rescale_betas_zero_snr" => cfg.rescale_betas_zero_snr = get_bool(key, v)?,
                k if SILENT_KEYS.contains(&k) => {}
                other => unknown_keys.push(other.to_string()),
            }
        }
        cfg.validate()?;
        Ok(LoadedSchedulerConfig {
            config: cfg,
            unknown_keys,
        })
    }

    /// Checks the values that do not depend on the number of inference steps.
    pub fn validate(&self) -> Result<()> {
        check_train_timesteps(self.num_train_timesteps)?;
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(Error::config(
                "clip_sample_range",
                self.clip_sample_range,
                "must be a positive number",
            ));
        }
        if !(self.dynamic_thresholding_ratio > 0.0 && self.dynamic_thresholding_ratio <= 1.0) {
            return Err(Error::config(
                "dynamic_thresholding_ratio",
                self.dynamic_thresholding_ratio,
                "must lie in (0, 1]",
            ));
        }
        if !(self.sample_max_value.is_finite() && self.sample_max_value >= 1.0) {
            return Err(Error::config(
                "sample_max_value",
                self.sample_max_value,
                "must be a number >= 1 (thresholds are clamped to [1, sample_max_value])",
            ));
        }
        for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !v.is_finite() {
                return Err(Error::config(key, v, "must be a finite number in (0, 1)"));
            }
        }
        Ok(())
    }

    /// The training betas this config describes (`trained_betas`, or the schedule), with
    /// zero-terminal-SNR rescaling applied when asked for.
    pub fn betas(&self) -> Result<Vec<f32>> {
        let betas = match &self.trained_betas {
            Some(values) => schedule::trained_betas(values, self.num_train_timesteps)?,
            None => schedule::betas_for_schedule(
                self.beta_schedule,
                self.num_train_timesteps,
                self.beta_start,
                self.beta_end,
            )?,
        };
        Ok(if self.rescale_betas_zero_snr {
            schedule::rescale_zero_terminal_snr(&betas)
        } else {
            betas
        })
    }

    /// The config as diffusers writes it for `kind` (only that class's keys, `_class_name`
    /// and `_diffusers_version`), so `from_pretrained` in diffusers loads it.
    pub fn to_json(&self, kind: SchedulerKind) -> Value {
        let mut obj = Map::new();
        obj.insert("_class_name".into(), kind.class_name().into());
        obj.insert("_diffusers_version".into(), "0.42.1".into());
        for &key in kind.keys() {
            let v: Value = match key {
                "num_train_timesteps" => self.num_train_timesteps.into(),
                "beta_start" => self.beta_start.into(),
                "beta_end" => self.beta_end.into(),
                "beta_schedule" => self.beta_schedule.name().into(),
                "trained_betas" => match &self.trained_betas {
                    Some(b) => b.clone().into(),
                    None => Value::Null,
                },
                "variance_type" => self.variance_type.name().into(),
                "clip_sample" => self.clip_sample.into(),
                "clip_sample_range" => self.clip_sample_range.into(),
                "set_alpha_to_one" => self.set_alpha_to_one.into(),
                "steps_offset" => self.steps_offset.into(),
                "prediction_type" => self.prediction_type.name().into(),
                "thresholding" => self.thresholding.into(),
                "dynamic_thresholding_ratio" => self.dynamic_thresholding_ratio.into(),
                "sample_max_value" => self.sample_max_value.into(),
                // `quad` is ours; diffusers refuses it by name at `set_timesteps`, which is
                // better than silently sampling another schedule.
                "timestep_spacing" => self.timestep_spacing.name().into(),
                "rescale_betas_zero_snr" => self.rescale_betas_zero_snr.into(),
                _ => continue,
            };
            obj.insert(key.into(), v);
        }
        Value::Object(obj)
    }

    /// Writes [`SchedulerConfig::to_json`] as pretty JSON to `path`.
    pub fn save(&self, kind: SchedulerKind, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut text =
            serde_json::to_string_pretty(&self.to_json(kind)).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        text.push('\n');
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn get_f64(key: &str, v: &Value) -> Result<f64> {
    crate::json::as_f64(v).ok_or_else(|| Error::config(key, short(v), "a number is expected"))
}

fn get_bool(key: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| Error::config(key, short(v), "true or false is expected"))
}

fn get_str<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| Error::config(key, short(v), "a string is expected"))
}

fn get_usize(key: &str, v: &Value) -> Result<usize> {
    // diffusers configs sometimes carry integral floats (1000.0).
    match (v.as_u64(), v.as_f64()) {
        (Some(n), _) => usize::try_from(n).ok(),
        (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Some(f as usize),
        _ => None,
    }
    .ok_or_else(|| Error::config(key, short(v), "a non-negative integer is expected"))
}

/// The most training timesteps a config may have: diffusers' models use 1,000 to 4,000; the
/// bound keeps a hostile config from asking for gigabytes of noise tables.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

fn check_train_timesteps(n: usize) -> Result<()> {
    if (1..=MAX_TRAIN_TIMESTEPS).contains(&n) {
        Ok(())
    } else {
        Err(Error::config(
            "num_train_timesteps",
            n,
            format!("must be 1 to {MAX_TRAIN_TIMESTEPS}"),
        ))
    }
}
