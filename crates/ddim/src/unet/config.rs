//! `UNet2DConfig`: the keys of diffusers' unet `config.json`, with the defaults of
//! `diffusers.UNet2DModel.__init__` (diffusers 0.42, `models/unets/unet_2d.py`).

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// How the timestep is turned into a vector before `time_embedding` (`time_embedding_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingType {
    /// Sinusoidal embedding (`Timesteps`, diffusers' `get_timestep_embedding`).
    Positional,
    /// Random Fourier features of `log(t)` (`GaussianFourierProjection`); the output is divided by `t`.
    Fourier,
    /// A learned table of `num_train_timesteps` rows (`nn.Embedding`).
    Learned,
}

/// The activation of the resnets (`act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (also spelled `swish`): `x * sigmoid(x)`.
    Silu,
    /// `mish`: `x * tanh(softplus(x))`.
    Mish,
    /// `gelu`: the exact (erf) GELU of `torch.nn.GELU()`.
    Gelu,
    /// `relu`.
    Relu,
}

/// How the time embedding enters a resnet (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResnetTimeScaleShift {
    /// `default`: added to the hidden state before `norm2`.
    Default,
    /// `scale_shift`: split into scale and shift, applied as `norm2(h) * (1 + scale) + shift`.
    ScaleShift,
}

/// How a block changes resolution (`downsample_type` / `upsample_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleType {
    /// A (strided) 3x3 convolution: `Downsample2D` / `Upsample2D`.
    Conv,
    /// A resnet with `down=True` / `up=True`.
    Resnet,
}

/// How class labels are embedded (`class_embed_type`). With `None` and `num_class_embeds` set,
/// a learned table (`nn.Embedding`) is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassEmbedType {
    /// `timestep`: the labels go through `time_proj`, then a second `TimestepEmbedding`.
    Timestep,
    /// `identity`: the labels are already `(b, time_embed_dim)` vectors.
    Identity,
}

/// One encoder block (`down_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    /// `DownBlock2D`: resnets, then a downsampler.
    DownBlock2D,
    /// `AttnDownBlock2D`: resnets each followed by self-attention, then a downsampler.
    AttnDownBlock2D,
    /// `ResnetDownsampleBlock2D`: resnets, then a resnet with `down=True`.
    ResnetDownsampleBlock2D,
}

/// One decoder block (`up_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    /// `UpBlock2D`: resnets over concatenated skips, then an upsampler.
    UpBlock2D,
    /// `AttnUpBlock2D`: resnets each followed by self-attention, then an upsampler.
    AttnUpBlock2D,
    /// `ResnetUpsampleBlock2D`: resnets, then a resnet with `up=True`.
    ResnetUpsampleBlock2D,
}

/// The middle block (`mid_block_type`); `None` in the config means no middle block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidBlockType {
    /// `UNetMidBlock2D`: resnet, attention (unless `add_attention` is false), resnet.
    UNetMidBlock2D,
}

/// A string-valued config key that maps onto one of our enums.
trait ConfigEnum: Sized + Copy + PartialEq + 'static {
    /// The JSON spellings and their values; the first spelling of each value is canonical.
    const VALUES: &'static [(&'static str, Self)];

    /// The canonical JSON spelling.
    fn name(self) -> &'static str {
        Self::VALUES
            .iter()
            .find(|(_, v)| *v == self)
            .map_or("", |(n, _)| *n)
    }

    fn parse(key: &str, value: &str) -> Result<Self> {
        Self::VALUES
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<String> =
                    Self::VALUES.iter().map(|(n, _)| format!("`{n}`")).collect();
                Error::config(
                    key,
                    format!("\"{value}\""),
                    format!("expected one of {}", names.join(", ")),
                )
            })
    }
}

impl ConfigEnum for TimeEmbeddingType {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("positional", Self::Positional),
        ("fourier", Self::Fourier),
        ("learned", Self::Learned),
    ];
}

impl ConfigEnum for Activation {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("silu", Self::Silu),
        ("swish", Self::Silu),
        ("mish", Self::Mish),
        ("gelu", Self::Gelu),
        ("relu", Self::Relu),
    ];
}

impl ConfigEnum for ResnetTimeScaleShift {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("default", Self::Default),
        ("scale_shift", Self::ScaleShift),
    ];
}

impl ConfigEnum for ResampleType {
    const VALUES: &'static [(&'static str, Self)] =
        &[("conv", Self::Conv), ("resnet", Self::Resnet)];
}

impl ConfigEnum for ClassEmbedType {
    const VALUES: &'static [(&'static str, Self)] =
        &[("timestep", Self::Timestep), ("identity", Self::Identity)];
}

impl ConfigEnum for DownBlockType {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("DownBlock2D", Self::DownBlock2D),
        ("AttnDownBlock2D", Self::AttnDownBlock2D),
        ("ResnetDownsampleBlock2D", Self::ResnetDownsampleBlock2D),
    ];
}

impl ConfigEnum for UpBlockType {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("UpBlock2D", Self::UpBlock2D),
        ("AttnUpBlock2D", Self::AttnUpBlock2D),
        ("ResnetUpsampleBlock2D", Self::ResnetUpsampleBlock2D),
    ];
}

impl ConfigEnum for MidBlockType {
    const VALUES: &'static [(&'static str, Self)] = &[("UNetMidBlock2D", Self::UNetMidBlock2D)];
}

/// The configuration of a [`UNet2DModel`](super::UNet2DModel): the keys of diffusers' unet
/// `config.json`, with diffusers' defaults (see [`Default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConfig {
    /// `sample_size`: the (height, width) the model was trained at, if known. Informational.
    pub sample_size: Option<(usize, usize)>,
    /// `in_channels`: channels of the input sample.
    pub in_channels: usize,
    /// `out_channels`: channels of the output.
    pub out_channels: usize,
    /// `center_input_sample`: map the input with `2 * x - 1` first.
    pub center_input_sample: bool,
    /// `time_embedding_type`.
    pub time_embedding_type: TimeEmbeddingType,
    /// `time_embedding_dim`: width of the time embedding; `None` means `4 * block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    /// `freq_shift`: `downscale_freq_shift` of the sinusoidal embedding.
    pub freq_shift: f64,
    /// `flip_sin_to_cos`: order the sinusoidal embedding as `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `down_block_types`, one per entry of `block_out_channels`.
    pub down_block_types: Vec<DownBlockType>,
    /// `mid_block_type`; `None` for no middle block.
    pub mid_block_type: Option<MidBlockType>,
    /// `up_block_types`, one per entry of `block_out_channels` (deepest first).
    pub up_block_types: Vec<UpBlockType>,
    /// `block_out_channels`: output channels of each down block.
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block`: resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// `mid_block_scale_factor`: the middle block divides its residual sums by this.
    pub mid_block_scale_factor: f64,
    /// `downsample_padding`: padding of the downsampling convolution; 0 pads right/bottom by one.
    pub downsample_padding: usize,
    /// `downsample_type` (used by `AttnDownBlock2D`).
    pub downsample_type: ResampleType,
    /// `upsample_type` (used by `AttnUpBlock2D`).
    pub upsample_type: ResampleType,
    /// `dropout`: only used in training; inference ignores it.
    pub dropout: f64,
    /// `act_fn`: the activation of the resnets.
    pub act_fn: Activation,
    /// `attention_head_dim`: width of one attention head; `None` means one head as wide as the block.
    pub attention_head_dim: Option<usize>,
    /// `norm_num_groups`: groups of every GroupNorm.
    pub norm_num_groups: usize,
    /// `attn_norm_num_groups`: groups of the middle block's attention norm; `None` means
    /// `norm_num_groups` with `resnet_time_scale_shift = "default"`, and no norm otherwise.
    pub attn_norm_num_groups: Option<usize>,
    /// `norm_eps`: epsilon of every GroupNorm.
    pub norm_eps: f64,
    /// `resnet_time_scale_shift`.
    pub resnet_time_scale_shift: ResnetTimeScaleShift,
    /// `add_attention`: whether the middle block has an attention layer.
    pub add_attention: bool,
    /// `class_embed_type`; see [`ClassEmbedType`].
    pub class_embed_type: Option<ClassEmbedType>,
    /// `num_class_embeds`: number of classes of a learned class table.
    pub num_class_embeds: Option<usize>,
    /// `num_train_timesteps`: rows of the learned time table (`time_embedding_type = "learned"`).
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DConfig {
    /// diffusers' defaults (`UNet2DModel()` with no arguments).
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: TimeEmbeddingType::Positional,
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: vec![
                DownBlockType::DownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
            ],
            mid_block_type: Some(MidBlockType::UNetMidBlock2D),
            up_block_types: vec![
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::UpBlock2D,
            ],
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: ResampleType::Conv,
            upsample_type: ResampleType::Conv,
            dropout: 0.0,
            act_fn: Activation::Silu,
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: ResnetTimeScaleShift::Default,
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// The diffusers version whose `UNet2DModel` keys and defaults this file follows.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// The config keys this crate reads; any other key not starting with `_` is reported as unknown.
const KNOWN_KEYS: &[&str] = &[
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

/// `sample_size` is an int or a `[height, width]` pair in diffusers.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Square(usize),
    Pair([usize; 2]),
}

/// The JSON as written, before enum strings are checked. `Option` + `default` everywhere so a
/// missing key (or JSON `null` where diffusers allows it) takes the default.
#[derive(Deserialize)]
struct RawConfig {
    sample_size: Option<RawSize>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    center_input_sample: Option<bool>,
    time_embedding_type: Option<String>,
    time_embedding_dim: Option<usize>,
    freq_shift: Option<f64>,
    flip_sin_to_cos: Option<bool>,
    down_block_types: Option<Vec<String>>,
    #[serde(default = "default_mid_block_type")]
    mid_block_type: Option<String>,
    up_block_types: Option<Vec<String>>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    mid_block_scale_factor: Option<f64>,
    downsample_padding: Option<usize>,
    downsample_type: Option<String>,
    upsample_type: Option<String>,
    dropout: Option<f64>,
    act_fn: Option<String>,
    #[serde(default = "default_attention_head_dim")]
    attention_head_dim: Option<usize>,
    norm_num_groups: Option<usize>,
    attn_norm_num_groups: Option<usize>,
    norm_eps: Option<f64>,
    resnet_time_scale_shift: Option<String>,
    add_attention: Option<bool>,
    class_embed_type: Option<String>,
    num_class_embeds: Option<usize>,
    num_train_timesteps: Option<usize>,
}

// For the two keys where an explicit `null` means something other than "missing".
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2D".to_string())
}

fn default_attention_head_dim() -> Option<usize> {
    UNet2DConfig::default().attention_head_dim
}

/// The enum value of `key`, or `default` when the key is missing or null.
fn opt_enum<T: ConfigEnum>(key: &str, value: Option<&String>, default: T) -> Result<T> {
    value.map_or(Ok(default), |s| T::parse(key, s))
}

/// diffusers' `get_down_block` / `get_up_block` strip a `UNetRes` prefix from block names.
fn strip_unet_res(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

impl UNet2DConfig {
    /// Parses a unet `config.json` text. Returns the config and the unknown keys (sorted; keys
    /// starting with `_` such as `_class_name` are not reported), so the caller can warn.
    ///
    /// ```
    /// let (cfg, unknown) = ddim::unet::UNet2DConfig::from_json_str(
    ///     r#"{"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    ///         "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "foo": 1}"#,
    /// )?;
    /// assert_eq!(cfg.block_out_channels, vec![32, 64]);
    /// assert_eq!(unknown, vec!["foo".to_string()]);
    /// # Ok::<(), ddim::Error>(())
    /// ```
    pub fn from_json_str(json: &str) -> Result<(Self, Vec<String>)> {
        Self::parse(json, Path::new("<config.json>"))
    }

    /// Reads and parses a unet `config.json` file; see [`UNet2DConfig::from_json_str`].
    pub fn from_file(path: &Path) -> Result<(Self, Vec<String>)> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    fn parse(json: &str, path: &Path) -> Result<(Self, Vec<String>)> {
        let json_err = |source| Error::Json {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value = crate::json::parse(json).map_err(json_err)?;
        let Some(object) = value.as_object() else {
            return Err(Error::config(
                "config.json",
                "a non-object",
                "expected a JSON object of UNet2DModel keys",
            ));
        };
        if let Some(class) = object.get("_class_name").and_then(|v| v.as_str()) {
            if class != "UNet2DModel" {
                return Err(Error::config(
                    "_class_name",
                    format!("\"{class}\""),
                    "expected `UNet2DModel` (other diffusers models are not supported)",
                ));
            }
        }
        let mut unknown: Vec<String> = object
            .keys()
            .filter(|k| !k.starts_with('_') && !KNOWN_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        unknown.sort();
        let raw: RawConfig = serde_json::from_value(value).map_err(json_err)?;
        let cfg = Self::from_raw(raw)?;
        cfg.validate()?;
        Ok((cfg, unknown))
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        let d = Self::default();
        let down_block_types = match raw.down_block_types {
            None => d.down_block_types,
            Some(names) => names
                .iter()
                .map(|n| DownBlockType::parse("down_block_types", strip_unet_res(n)))
                .collect::<Result<_>>()?,
        };
        let up_block_types = match raw.up_block_types {
            None => d.up_block_types,
            Some(names) => names
                .iter()
                .map(|n| UpBlockType::parse("up_block_types", strip_unet_res(n)))
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            sample_size: raw.sample_size.map(|s| match s {
                RawSize::Square(n) => (n, n),
                RawSize::Pair([h, w]) => (h, w),
            }),
            in_channels: raw.in_channels.unwrap_or(d.in_channels),
            out_channels: raw.out_channels.unwrap_or(d.out_channels),
            center_input_sample: raw.center_input_sample.unwrap_or(d.center_input_sample),
            time_embedding_type: opt_enum(
                "time_embedding_type",
                raw.time_embedding_type.as_ref(),
                d.time_embedding_type,
            )?,
            time_embedding_dim: raw.time_embedding_dim,
            freq_shift: raw.freq_shift.unwrap_or(d.freq_shift),
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(d.flip_sin_to_cos),
            down_block_types,
            mid_block_type: raw
                .mid_block_type
                .map(|s| MidBlockType::parse("mid_block_type", &s))
                .transpose()?,
            up_block_types,
            block_out_channels: raw.block_out_channels.unwrap_or(d.block_out_channels),
            layers_per_block: raw.layers_per_block.unwrap_or(d.layers_per_block),
            mid_block_scale_factor: raw
                .mid_block_scale_factor
                .unwrap_or(d.mid_block_scale_factor),
            downsample_padding: raw.downsample_padding.unwrap_or(d.downsample_padding),
            downsample_type: opt_enum(
                "downsample_type",
                raw.downsample_type.as_ref(),
                d.downsample_type,
            )?,
            upsample_type: opt_enum("upsample_type", raw.upsample_type.as_ref(), d.upsample_type)?,
            dropout: raw.dropout.unwrap_or(d.dropout),
            act_fn: opt_enum("act_fn", raw.act_fn.as_ref(), d.act_fn)?,
            attention_head_dim: raw.attention_head_dim,
            norm_num_groups: raw.norm_num_groups.unwrap_or(d.norm_num_groups),
            attn_norm_num_groups: raw.attn_norm_num_groups,
            norm_eps: raw.norm_eps.unwrap_or(d.norm_eps),
            resnet_time_scale_shift: opt_enum(
                "resnet_time_scale_shift",
                raw.resnet_time_scale_shift.as_ref(),
                d.resnet_time_scale_shift,
            )?,
            add_attention: raw.add_attention.unwrap_or(d.add_attention),
            class_embed_type: raw
                .class_embed_type
                .map(|s| ClassEmbedType::parse("class_embed_type", &s))
                .transpose()?,
            num_class_embeds: raw.num_class_embeds,
            num_train_timesteps: raw.num_train_timesteps,
        })
    }

    /// The config as diffusers writes it to `config.json`: every key, with `_class_name` =
    /// `UNet2DModel`, so that a folder we save loads with `UNet2DModel.from_pretrained`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Value};
        // diffusers types these as int and writes e.g. `1`, not `1.0`.
        let int_if_whole = |v: f64| {
            if v.fract() == 0.0 && v.abs() < 9e15 {
                json!(v as i64)
            } else {
                json!(v)
            }
        };
        let sample_size = match self.sample_size {
            None => Value::Null,
            Some((h, w)) if h == w => json!(h),
            Some((h, w)) => json!([h, w]),
        };
        let names = |v: Vec<&str>| json!(v);
        json!({
            "_class_name": "UNet2DModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "time_embedding_type": self.time_embedding_type.name(),
            "time_embedding_dim": self.time_embedding_dim,
            "freq_shift": int_if_whole(self.freq_shift),
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "down_block_types": names(self.down_block_types.iter().map(|t| t.name()).collect()),
            "mid_block_type": self.mid_block_type.map(|t| t.name()),
            "up_block_types": names(self.up_block_types.iter().map(|t| t.name()).collect()),
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": int_if_whole(self.mid_block_scale_factor),
            "downsample_padding": self.downsample_padding,
            "downsample_type": self.downsample_type.name(),
            "upsample_type": self.upsample_type.name(),
            "dropout": self.dropout,
            "act_fn": self.act_fn.name(),
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            "attn_norm_num_groups": self.attn_norm_num_groups,
            "norm_eps": self.norm_eps,
            "resnet_time_scale_shift": self.resnet_time_scale_shift.name(),
            "add_attention": self.add_attention,
            "class_embed_type": self.class_embed_type.map(|t| t.name()),
            "num_class_embeds": self.num_class_embeds,
            "num_train_timesteps": self.num_train_timesteps,
        })
    }

    /// Width of the time embedding: `time_embedding_dim`, or `4 * block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        match self.time_embedding_dim {
            Some(d) if d > 0 => d,
            _ => self.block_out_channels.first().copied().unwrap_or(0) * 4,
        }
    }

    /// The factor by which height and width must be divisible: `2^(number of downsamplers)`.
    pub fn spatial_divisor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that the values fit together (list lengths, group divisibility, head widths, ...).
    /// [`UNet2DConfig::from_json_str`] and [`UNet2DModel::new`](super::UNet2DModel::new) call it.
    pub fn validate(&self) -> Result<()> {
        let channels = &self.block_out_channels;
        let list = |v: &[usize]| format!("{v:?}");
        if channels.is_empty() || channels.contains(&0) {
            return Err(Error::config(
                "block_out_channels",
                list(channels),
                "expected a non-empty list of positive channel counts",
            ));
        }
        if channels.len() > 16 {
            return Err(Error::config(
                "block_out_channels",
                list(channels),
                "expected at most 16 blocks",
            ));
        }
        if self.down_block_types.len() != channels.len() {
            return Err(Error::config(
                "down_block_types",
                format!("{:?}", self.down_block_types),
                format!(
                    "expected one block per entry of block_out_channels ({} entries)",
                    channels.len()
                ),
            ));
        }
        if self.up_block_types.len() != channels.len() {
            return Err(Error::config(
                "up_block_types",
                format!("{:?}", self.up_block_types),
                format!(
                    "expected one block per entry of block_out_channels ({} entries)",
                    channels.len()
                ),
            ));
        }
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if value == 0 {
                return Err(Error::config(
                    key,
                    value,
                    "expected a positive channel count",
                ));
            }
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err(Error::config(
                "norm_num_groups",
                groups,
                "expected a positive number of groups",
            ));
        }
        if let Some(&c) = channels.iter().find(|&&c| c % groups != 0) {
            return Err(Error::config(
                "norm_num_groups",
                groups,
                format!(
                    "every entry of block_out_channels {} must be divisible by it ({c} is not)",
                    list(channels)
                ),
            ));
        }
        if let Some(attn_groups) = self.attn_norm_num_groups {
            let c = channels[channels.len() - 1];
            if attn_groups == 0 || !c.is_multiple_of(attn_groups) {
                return Err(Error::config(
                    "attn_norm_num_groups",
                    attn_groups,
                    format!("the last block_out_channels entry ({c}) must be divisible by it"),
                ));
            }
        }
        if let Some(head_dim) = self.attention_head_dim {
            for (c, attn) in self.attention_channels() {
                if attn && (head_dim == 0 || head_dim > c) {
                    return Err(Error::config(
                        "attention_head_dim",
                        head_dim,
                        format!("expected between 1 and the channels of each attention block ({c}), or null"),
                    ));
                }
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::config(
                "norm_eps",
                self.norm_eps,
                "expected a positive number",
            ));
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor != 0.0) {
            return Err(Error::config(
                "mid_block_scale_factor",
                self.mid_block_scale_factor,
                "expected a finite non-zero number",
            ));
        }
        let half_dim = (channels[0] / 2) as f64;
        if self.time_embedding_type == TimeEmbeddingType::Positional
            && (!self.freq_shift.is_finite() || half_dim - self.freq_shift == 0.0)
        {
            return Err(Error::config(
                "freq_shift",
                self.freq_shift,
                format!("must be finite and differ from block_out_channels[0] / 2 = {half_dim}"),
            ));
        }
        if self.time_embedding_type == TimeEmbeddingType::Learned
            && self.num_train_timesteps.unwrap_or(0) == 0
        {
            return Err(Error::config(
                "num_train_timesteps",
                format!("{:?}", self.num_train_timesteps),
                "time_embedding_type \"learned\" needs a positive num_train_timesteps",
            ));
        }
        if self.class_embed_type.is_none() && self.num_class_embeds == Some(0) {
            return Err(Error::config(
                "num_class_embeds",
                0,
                "expected a positive number of classes or null",
            ));
        }
        if self.time_embed_dim() == 0 {
            return Err(Error::config(
                "time_embedding_dim",
                0,
                "expected a positive width or null",
            ));
        }
        Ok(())
    }

    /// (channels, has attention) of every block that may carry attention.
    fn attention_channels(&self) -> Vec<(usize, bool)> {
        let channels = &self.block_out_channels;
        let mut out: Vec<(usize, bool)> = self
            .down_block_types
            .iter()
            .zip(channels)
            .map(|(t, &c)| (c, *t == DownBlockType::AttnDownBlock2D))
            .collect();
        out.extend(
            self.up_block_types
                .iter()
                .zip(channels.iter().rev())
                .map(|(t, &c)| (c, *t == UpBlockType::AttnUpBlock2D)),
        );
        if let Some(&c) = channels.last() {
            out.push((c, self.mid_block_type.is_some() && self.add_attention));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_takes_diffusers_defaults() {
        let (cfg, unknown) = UNet2DConfig::from_json_str("{}").unwrap();
        assert_eq!(cfg, UNet2DConfig::default());
        assert!(unknown.is_empty());
    }

    #[test]
    fn unknown_and_underscore_keys() {
        let (_, unknown) = UNet2DConfig::from_json_str(
            r#"{"_class_name": "UNet2DModel", "zeta": 1, "alpha": null}"#,
        )
        .unwrap();
        assert_eq!(unknown, vec!["alpha".to_string(), "zeta".to_string()]);
    }

    #[test]
    fn null_mid_block_and_head_dim_are_kept() {
        let (cfg, _) =
            UNet2DConfig::from_json_str(r#"{"mid_block_type": null, "attention_head_dim": null}"#)
                .unwrap();
        assert_eq!(cfg.mid_block_type, None);
        assert_eq!(cfg.attention_head_dim, None);
    }

    #[test]
    fn sample_size_pair_and_legacy_block_names() {
        let (cfg, _) = UNet2DConfig::from_json_str(
            r#"{"sample_size": [32, 48], "block_out_channels": [32],
                "down_block_types": ["UNetResDownBlock2D"], "up_block_types": ["UpBlock2D"]}"#,
        )
        .unwrap();
        assert_eq!(cfg.sample_size, Some((32, 48)));
        assert_eq!(cfg.down_block_types, vec![DownBlockType::DownBlock2D]);
    }

    #[test]
    fn bad_enum_value_names_key_value_and_allowed() {
        let err = UNet2DConfig::from_json_str(r#"{"time_embedding_type": "adm"}"#).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{msg}");
        assert!(
            msg.contains("time_embedding_type") && msg.contains("adm") && msg.contains("fourier"),
            "{msg}"
        );
        let err = UNet2DConfig::from_json_str(r#"{"down_block_types": ["CrossAttnDownBlock2D"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CrossAttnDownBlock2D") && err.contains("AttnDownBlock2D"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_values_are_rejected() {
        let cases = [
            (r#"{"block_out_channels": [32, 64]}"#, "down_block_types"),
            (
                r#"{"block_out_channels": [30, 60, 90, 120], "norm_num_groups": 32}"#,
                "norm_num_groups",
            ),
            (r#"{"attention_head_dim": 1000}"#, "attention_head_dim"),
            (
                r#"{"time_embedding_type": "learned"}"#,
                "num_train_timesteps",
            ),
            (r#"{"_class_name": "UNet2DConditionModel"}"#, "_class_name"),
        ];
        for (json, key) in cases {
            let err = UNet2DConfig::from_json_str(json).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidConfig { key: k, .. } if k == key),
                "{json}: {err}"
            );
        }
    }
}
