//! `scheduler_config.json`: diffusers' exact keys and defaults (diffusers 0.42
//! `DDIMScheduler`, `DDPMScheduler`, `DDIMInverseScheduler`), legacy files, and writing back.

use std::path::Path;

use serde::{Deserialize, Serialize};
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

/// Which differential equation a multistep solver integrates (`algorithm_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgorithmType {
    /// DPM-Solver on the noise prediction (Lu et al. 2022a).
    DpmSolver,
    /// DPM-Solver++ on the data prediction (Lu et al. 2022b).
    DpmSolverPlusPlus,
    /// The SDE variant of DPM-Solver (stochastic).
    SdeDpmSolver,
    /// The SDE variant of DPM-Solver++ (stochastic).
    SdeDpmSolverPlusPlus,
    /// DEIS (Zhang & Chen 2022).
    Deis,
}

/// The multistep solver's update rule (`solver_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    /// DPM-Solver's second-order midpoint rule.
    Midpoint,
    /// DPM-Solver's second-order Heun rule.
    Heun,
    /// DEIS's log-rho rule.
    Logrho,
    /// UniPC's B(h) = h.
    Bh1,
    /// UniPC's B(h) = e^h - 1.
    Bh2,
}

/// The last sigma of a sigma schedule (`final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// 0: the last step lands on the clean sample.
    Zero,
    /// The training schedule's smallest sigma.
    SigmaMin,
}

/// How Euler-type schedulers interpolate sigmas between training timesteps (`interpolation_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterpolationType {
    /// Linear in sigma.
    Linear,
    /// Linear in log sigma.
    LogLinear,
}

/// What the model's timestep input is for Euler (`timestep_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepType {
    /// The (fractional) training timestep.
    Discrete,
    /// 0.25 log sigma (EDM-style models).
    Continuous,
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
named_enum!(AlgorithmType, "algorithm_type",
    DpmSolver => "dpmsolver", DpmSolverPlusPlus => "dpmsolver++", SdeDpmSolver => "sde-dpmsolver",
    SdeDpmSolverPlusPlus => "sde-dpmsolver++", Deis => "deis");
named_enum!(SolverType, "solver_type",
    Midpoint => "midpoint", Heun => "heun", Logrho => "logrho", Bh1 => "bh1", Bh2 => "bh2");
named_enum!(FinalSigmasType, "final_sigmas_type", Zero => "zero", SigmaMin => "sigma_min");
named_enum!(InterpolationType, "interpolation_type", Linear => "linear", LogLinear => "log_linear");
named_enum!(TimestepType, "timestep_type", Discrete => "discrete", Continuous => "continuous");

/// Which diffusers scheduler class a config file names (`_class_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler` (also the legacy `GaussianDDPMScheduler`).
    Ddpm,
    /// `DDIMInverseScheduler`.
    DdimInverse,
    /// `DPMSolverMultistepScheduler` (DPM-Solver and DPM-Solver++, Lu et al. 2022).
    DpmSolverMultistep,
    /// `UniPCMultistepScheduler` (Zhao et al. 2023).
    UniPcMultistep,
    /// `DEISMultistepScheduler` (Zhang & Chen 2022).
    DeisMultistep,
    /// `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestralDiscrete,
    /// `HeunDiscreteScheduler` (Karras et al. 2022, Algorithm 1).
    HeunDiscrete,
    /// `PNDMScheduler` (Liu et al. 2022: PRK and PLMS).
    Pndm,
    /// `LMSDiscreteScheduler` (linear multistep).
    LmsDiscrete,
}

impl SchedulerKind {
    /// Every kind.
    pub const ALL: &'static [SchedulerKind] = &[
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::DdimInverse,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::UniPcMultistep,
        SchedulerKind::DeisMultistep,
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
        SchedulerKind::HeunDiscrete,
        SchedulerKind::Pndm,
        SchedulerKind::LmsDiscrete,
    ];

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::DdimInverse => "DDIMInverseScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::UniPcMultistep => "UniPCMultistepScheduler",
            SchedulerKind::DeisMultistep => "DEISMultistepScheduler",
            SchedulerKind::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerKind::HeunDiscrete => "HeunDiscreteScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::LmsDiscrete => "LMSDiscreteScheduler",
        }
    }

    /// The kind for a diffusers class name, if it is one we implement.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "GaussianDDPMScheduler" => Some(SchedulerKind::Ddpm),
            _ => Self::ALL.iter().copied().find(|k| k.class_name() == name),
        }
    }

    /// Every key of this class's config, in diffusers' order: what
    /// [`SchedulerConfig::to_json`] writes and what [`SchedulerConfig::converted_to`] carries
    /// over to another class.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            SchedulerKind::Ddim => &[
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
            ],
            SchedulerKind::Ddpm => &[
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
            ],
            SchedulerKind::DdimInverse => &[
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
            ],
            SchedulerKind::DpmSolverMultistep => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "solver_order",
                "prediction_type",
                "thresholding",
                "dynamic_thresholding_ratio",
                "sample_max_value",
                "algorithm_type",
                "solver_type",
                "lower_order_final",
                "euler_at_final",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
                "flow_shift",
                "final_sigmas_type",
                "lambda_min_clipped",
                "variance_type",
                "timestep_spacing",
                "steps_offset",
                "rescale_betas_zero_snr",
                "use_dynamic_shifting",
                "time_shift_type",
            ],
            SchedulerKind::UniPcMultistep => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "solver_order",
                "prediction_type",
                "thresholding",
                "dynamic_thresholding_ratio",
                "sample_max_value",
                "predict_x0",
                "solver_type",
                "lower_order_final",
                "disable_corrector",
                "solver_p",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_flow_sigmas",
                "flow_shift",
                "timestep_spacing",
                "steps_offset",
                "final_sigmas_type",
                "rescale_betas_zero_snr",
                "use_dynamic_shifting",
                "time_shift_type",
                "sigma_min",
                "sigma_max",
                "shift_terminal",
            ],
            SchedulerKind::DeisMultistep => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "solver_order",
                "prediction_type",
                "thresholding",
                "dynamic_thresholding_ratio",
                "sample_max_value",
                "algorithm_type",
                "solver_type",
                "lower_order_final",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_flow_sigmas",
                "flow_shift",
                "timestep_spacing",
                "steps_offset",
                "use_dynamic_shifting",
                "time_shift_type",
            ],
            SchedulerKind::EulerDiscrete => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "prediction_type",
                "interpolation_type",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "sigma_min",
                "sigma_max",
                "timestep_spacing",
                "timestep_type",
                "steps_offset",
                "rescale_betas_zero_snr",
                "final_sigmas_type",
            ],
            SchedulerKind::EulerAncestralDiscrete => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "prediction_type",
                "timestep_spacing",
                "steps_offset",
                "rescale_betas_zero_snr",
            ],
            SchedulerKind::HeunDiscrete => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "prediction_type",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "clip_sample",
                "clip_sample_range",
                "timestep_spacing",
                "steps_offset",
            ],
            SchedulerKind::Pndm => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "skip_prk_steps",
                "set_alpha_to_one",
                "prediction_type",
                "timestep_spacing",
                "steps_offset",
            ],
            SchedulerKind::LmsDiscrete => &[
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "prediction_type",
                "timestep_spacing",
                "steps_offset",
            ],
        }
    }

    /// This class's defaults for every key (diffusers 0.42's `__init__` defaults).
    pub fn defaults(self) -> SchedulerConfig {
        let base = SchedulerConfig {
            class_name: Some(self.class_name().to_string()),
            ..SchedulerConfig::default()
        };
        let linspace = SchedulerConfig {
            timestep_spacing: TimestepSpacing::Linspace,
            ..base.clone()
        };
        match self {
            SchedulerKind::Ddim | SchedulerKind::Ddpm | SchedulerKind::DdimInverse => base,
            SchedulerKind::DpmSolverMultistep => SchedulerConfig {
                variance_type: None,
                ..linspace
            },
            SchedulerKind::UniPcMultistep => SchedulerConfig {
                solver_type: SolverType::Bh2,
                ..linspace
            },
            SchedulerKind::DeisMultistep => SchedulerConfig {
                algorithm_type: AlgorithmType::Deis,
                solver_type: SolverType::Logrho,
                ..linspace
            },
            SchedulerKind::EulerDiscrete
            | SchedulerKind::EulerAncestralDiscrete
            | SchedulerKind::LmsDiscrete => linspace,
            SchedulerKind::HeunDiscrete => SchedulerConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                clip_sample: false,
                ..linspace
            },
            SchedulerKind::Pndm => SchedulerConfig {
                set_alpha_to_one: false,
                ..base
            },
        }
    }
}

/// Every key of the diffusers scheduler configs ddim reads, under diffusers' names. Each class
/// reads the keys it has ([`SchedulerKind::keys`]); the others keep their defaults.
///
/// A file is read against the defaults of the class it names ([`SchedulerConfig::from_json`]):
/// keys it omits take that class's `__init__` defaults, as in diffusers' `from_pretrained`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// `_class_name`, when the file names one.
    #[serde(skip)]
    pub class_name: Option<String>,
    /// T, the number of training timesteps.
    #[serde(deserialize_with = "de::usize")]
    pub num_train_timesteps: usize,
    /// First beta of the `linear`/`scaled_linear`/`sigmoid` schedules.
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub beta_start: f64,
    /// Last beta of the `linear`/`scaled_linear`/`sigmoid` schedules.
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub beta_end: f64,
    /// The beta schedule (ignored when `trained_betas` is given).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, one per training timestep.
    #[serde(deserialize_with = "de::opt_f64s")]
    pub trained_betas: Option<Vec<f64>>,
    /// The variance of DDPM's ancestral step; `learned`/`learned_range` also tell other
    /// samplers that the model has 2·C output channels. `None` (JSON `null`) is `fixed_small`.
    pub variance_type: Option<VarianceType>,
    /// Clip the predicted x_0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// See `clip_sample`.
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub clip_sample_range: f64,
    /// DDIM: ᾱ after the last step is 1 (true) or ᾱ_0 (false). Inverse: ᾱ before the first step.
    pub set_alpha_to_one: bool,
    /// Added to every `leading` timestep (Stable Diffusion uses 1).
    #[serde(deserialize_with = "de::usize")]
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of x_0 (Saharia et al. 2022, Imagen); replaces `clip_sample`.
    pub thresholding: bool,
    /// The quantile of |x_0| used by dynamic thresholding.
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub dynamic_thresholding_ratio: f64,
    /// The largest threshold of dynamic thresholding.
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub sample_max_value: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
    /// Multistep solvers: the order, 1 to 3.
    #[serde(deserialize_with = "de::usize")]
    pub solver_order: usize,
    /// DPM-Solver's and DEIS's algorithm.
    pub algorithm_type: AlgorithmType,
    /// The multistep update rule.
    pub solver_type: SolverType,
    /// Multistep solvers: lower the order at the last steps (when fewer than 15 steps).
    pub lower_order_final: bool,
    /// DPM-Solver: a first-order (Euler) last step.
    pub euler_at_final: bool,
    /// Sigmas of Karras et al. 2022 (eq. 5, rho = 7) instead of the training schedule's.
    pub use_karras_sigmas: bool,
    /// Exponentially spaced sigmas (not implemented here: must be false).
    pub use_exponential_sigmas: bool,
    /// Beta-distributed sigmas (not implemented here: must be false).
    pub use_beta_sigmas: bool,
    /// DPM-Solver: sigmas uniform in log-SNR (Lu et al. 2022b).
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas (not for DDPM-trained models: must be false).
    pub use_flow_sigmas: bool,
    /// Flow-matching shift (only with `use_flow_sigmas`).
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub flow_shift: f64,
    /// The last sigma of the schedule.
    pub final_sigmas_type: FinalSigmasType,
    /// DPM-Solver: the smallest log-SNR λ a timestep may have (for the cosine schedule).
    #[serde(deserialize_with = "de::f64", serialize_with = "ser::f64")]
    pub lambda_min_clipped: f64,
    /// Resolution-dependent timestep shifting (not implemented here: must be false).
    pub use_dynamic_shifting: bool,
    /// The shift function of `use_dynamic_shifting`.
    pub time_shift_type: String,
    /// UniPC: predict x_0 (UniPC on the data prediction) rather than ε.
    pub predict_x0: bool,
    /// UniPC: the steps whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    /// UniPC: a predictor scheduler object (not representable here: must be null).
    pub solver_p: Option<Value>,
    /// Euler/UniPC: the smallest sigma of Karras sigmas (the schedule's when null).
    #[serde(deserialize_with = "de::opt_f64", serialize_with = "ser::opt_f64")]
    pub sigma_min: Option<f64>,
    /// Euler/UniPC: the largest sigma of Karras sigmas (the schedule's when null).
    #[serde(deserialize_with = "de::opt_f64", serialize_with = "ser::opt_f64")]
    pub sigma_max: Option<f64>,
    /// Stretch of shifted schedules (not implemented here: must be null).
    #[serde(deserialize_with = "de::opt_f64", serialize_with = "ser::opt_f64")]
    pub shift_terminal: Option<f64>,
    /// Euler: how sigmas are interpolated between training timesteps.
    pub interpolation_type: InterpolationType,
    /// Euler: the model's timestep input.
    pub timestep_type: TimestepType,
    /// PNDM: start with PLMS steps instead of four Runge-Kutta steps.
    pub skip_prk_steps: bool,
}

impl Default for SchedulerConfig {
    /// diffusers' `DDIMScheduler` defaults (`variance_type` being `DDPMScheduler`'s).
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: Some(VarianceType::FixedSmall),
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
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".to_string(),
            predict_x0: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
            interpolation_type: InterpolationType::Linear,
            timestep_type: TimestepType::Discrete,
            skip_prk_steps: false,
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
    /// Keys that no scheduler here knows, in file order; they were ignored.
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

    /// Parses a config from a JSON value (an object of diffusers keys): the keys it has over
    /// the defaults of the class its `_class_name` names (`DDIMScheduler`'s when it names none
    /// or one ddim does not implement). The legacy `timesteps` key is T when
    /// `num_train_timesteps` is absent.
    pub fn from_json(value: &Value) -> Result<LoadedSchedulerConfig> {
        let obj = value.as_object().ok_or_else(|| {
            Error::config(
                "scheduler_config",
                short(value),
                "a JSON object of diffusers scheduler keys is expected",
            )
        })?;
        let class_name = obj.get("_class_name").and_then(Value::as_str);
        let kind = class_name.and_then(SchedulerKind::from_class_name);
        let mut merged = kind
            .map_or_else(Self::default, SchedulerKind::defaults)
            .to_map();
        let mut unknown_keys = Vec::new();
        for (key, v) in obj {
            let key = match key.as_str() {
                "timesteps" if !obj.contains_key("num_train_timesteps") => "num_train_timesteps",
                k if k.starts_with('_') || SILENT_KEYS.contains(&k) || k == "timesteps" => continue,
                k => k,
            };
            match merged.get_mut(key) {
                Some(slot) => *slot = v.clone(),
                None => unknown_keys.push(key.to_string()),
            }
        }
        let mut config = Self::deserialize_map(merged, obj)?;
        config.class_name = class_name.map(str::to_string);
        config.validate()?;
        Ok(LoadedSchedulerConfig {
            config,
            unknown_keys,
        })
    }

    /// The config as another class reads it, as diffusers' `Class.from_config(scheduler.config)`
    /// does: the keys this config's class has (every one of them, its defaults included) carry
    /// over, the target class's other keys take its defaults.
    ///
    /// A config that names no class is taken as a plain dict of keys: every key carries over.
    pub fn converted_to(&self, kind: SchedulerKind) -> Result<SchedulerConfig> {
        let mine = self.to_map();
        let carried: Vec<&str> = match self.kind() {
            Some(from) => from.keys().to_vec(),
            None => mine.keys().map(String::as_str).collect(),
        };
        let mut merged = kind.defaults().to_map();
        for key in carried {
            if let (Some(slot), Some(v)) = (merged.get_mut(key), mine.get(key)) {
                *slot = v.clone();
            }
        }
        let mut config: SchedulerConfig = serde_json::from_value(Value::Object(merged))
            .map_err(|e| Error::config("scheduler_config", kind.class_name(), e.to_string()))?;
        config.class_name = Some(kind.class_name().to_string());
        config.validate()?;
        Ok(config)
    }

    /// This config with some of its class's keys set (`--scheduler-option`, a sampler's short
    /// name): each key must be one its class has, each value one the key takes.
    pub fn with_options(&self, options: &Map<String, Value>) -> Result<SchedulerConfig> {
        let kind = self.kind().unwrap_or(SchedulerKind::Ddim);
        let mut merged = self.to_map();
        for (key, v) in options {
            if !kind.keys().contains(&key.as_str()) {
                return Err(Error::config(
                    key,
                    short(v),
                    format!(
                        "is not an option of {}; its options: {}",
                        kind.class_name(),
                        kind.keys().join(", ")
                    ),
                ));
            }
            merged.insert(key.clone(), v.clone());
        }
        let mut config = Self::deserialize_map(merged, options)?;
        config.class_name = self.class_name.clone();
        config.validate()?;
        Ok(config)
    }

    /// The config of a full map of keys; an error names the key, with the value `given` had.
    fn deserialize_map(
        merged: Map<String, Value>,
        given: &Map<String, Value>,
    ) -> Result<SchedulerConfig> {
        serde_path_to_error::deserialize(Value::Object(merged)).map_err(|e| {
            let key = e.path().to_string();
            let found = given.get(&key).map_or_else(|| "?".into(), short);
            Error::config(&key, found, e.into_inner().to_string())
        })
    }

    /// Every key and value, as [`serde_json`] writes them (non-finite numbers as the strings
    /// [`crate::json::parse`] makes of Python's tokens).
    fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // A struct of plain fields always serialises to an object.
            _ => unreachable!("SchedulerConfig serialises to a JSON object"),
        }
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

    /// Refuses options diffusers has that ddim does not implement, naming the key, when they
    /// are set away from their defaults (a file that merely lists them at their defaults is fine).
    pub fn check_implemented(&self, kind: SchedulerKind) -> Result<()> {
        let keys = kind.keys();
        let refuse = |key: &str, value: String, why: &str| -> Result<()> {
            if keys.contains(&key) {
                Err(Error::config(key, value, why.to_string()))
            } else {
                Ok(())
            }
        };
        for (key, set) in [
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_flow_sigmas", self.use_flow_sigmas),
            ("use_dynamic_shifting", self.use_dynamic_shifting),
        ] {
            if set {
                refuse(
                    key,
                    "true".into(),
                    "must be false: this option is for flow-matching or \
                    resolution-shifted models, not implemented in ddim",
                )?;
            }
        }
        if let Some(v) = self.shift_terminal {
            refuse(
                "shift_terminal",
                v.to_string(),
                "must be null: terminal shifting is not implemented in ddim",
            )?;
        }
        if self.solver_p.as_ref().is_some_and(|v| !v.is_null()) {
            refuse(
                "solver_p",
                "a scheduler".into(),
                "must be null: a predictor scheduler cannot be given in a config file",
            )?;
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

    /// The config as diffusers writes it for `kind`: that class's keys, `_class_name` and
    /// `_diffusers_version`, so `from_pretrained` in diffusers loads it.
    pub fn to_json(&self, kind: SchedulerKind) -> Value {
        let mut all = self.to_map();
        let mut obj = Map::new();
        obj.insert("_class_name".into(), kind.class_name().into());
        obj.insert("_diffusers_version".into(), "0.42.1".into());
        for &key in kind.keys() {
            if let Some(v) = all.remove(key) {
                obj.insert(key.into(), v);
            }
        }
        Value::Object(obj)
    }

    /// Writes [`SchedulerConfig::to_json`] to `path` as diffusers does (pretty, with Python's
    /// tokens for non-finite numbers).
    pub fn save(&self, kind: SchedulerKind, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut text =
            crate::json::to_python_text(&self.to_json(kind)).map_err(|source| Error::Json {
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

/// Enums are written and read by their diffusers names, with [`Error`]'s list of the allowed
/// names when a name is unknown.
macro_rules! serde_by_name {
    ($($ty:ty),+ $(,)?) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let name = String::deserialize(d)?;
                Self::from_name(&name).map_err(|e| match e {
                    Error::InvalidConfig { allowed, .. } => serde::de::Error::custom(allowed),
                    other => serde::de::Error::custom(other),
                })
            }
        }
    )+};
}

serde_by_name!(
    BetaSchedule,
    PredictionType,
    TimestepSpacing,
    VarianceType,
    AlgorithmType,
    SolverType,
    FinalSigmasType,
    InterpolationType,
    TimestepType,
);

/// Readers for what diffusers' JSON holds beyond serde's defaults: Python's non-finite tokens
/// (as [`crate::json::parse`] keeps them) and integers written as floats (`1000.0`).
mod de {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    fn number<'de, D: Deserializer<'de>>(v: &Value) -> Result<f64, D::Error> {
        crate::json::as_f64(v).ok_or_else(|| D::Error::custom("a number is expected"))
    }

    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        number::<D>(&Value::deserialize(d)?)
    }

    pub fn opt_f64s<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::Array(items) => items
                .iter()
                .map(number::<D>)
                .collect::<Result<_, _>>()
                .map(Some),
            _ => Err(D::Error::custom("a list of numbers or null is expected")),
        }
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let v = Value::deserialize(d)?;
        match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => usize::try_from(n).ok(),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Some(f as usize),
            _ => None,
        }
        .ok_or_else(|| D::Error::custom("a non-negative integer is expected"))
    }

    pub fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            v => number::<D>(&v).map(Some),
        }
    }
}

/// Writers matching [`de`]: a non-finite number as the string of its Python token.
mod ser {
    use serde::Serializer;

    pub fn f64<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match crate::json::non_finite_name(*v) {
            Some(name) => s.serialize_str(name),
            None => s.serialize_f64(*v),
        }
    }

    pub fn opt_f64<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => f64(x, s),
            None => s.serialize_none(),
        }
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
