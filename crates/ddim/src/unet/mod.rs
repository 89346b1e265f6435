//! `UNet2DModel`, the noise-prediction network of DDPM/DDIM, following diffusers 0.42
//! `models/unets/unet_2d.py` with diffusers' weight names.

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod resnet;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use crate::ops::{Conv2d, GroupNorm};

pub use config::{
    Activation, ClassEmbedType, DownBlockType, MidBlockType, ResampleType, ResnetTimeScaleShift,
    TimeEmbeddingType, UNet2DConfig, UpBlockType,
};

use blocks::{DownBlock, UNetMidBlock2D, UpBlock};

/// The convolutions of a model with the height and width of their inputs, in forward order.
pub(crate) type ConvSizes<'a> = Vec<(&'a Conv2d, (usize, usize))>;
use embeddings::{GaussianFourierProjection, TimeProjection, TimestepEmbedding, Timesteps};
use resnet::{conv3x3, ResnetSettings};

use crate::{Error, Result};

/// A weight source that only adds up the sizes asked for ([`UNet2DModel::parameter_count`]).
#[derive(Default)]
struct ShapeCounter {
    total: std::sync::Arc<std::sync::Mutex<usize>>,
}

impl candle_nn::var_builder::SimpleBackend for ShapeCounter {
    fn get(
        &self,
        s: candle_core::Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut total = self
            .total
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter count poisoned".into()))?;
        *total = total.saturating_add(s.elem_count());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("parameter count: no shape given for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// `class_embedding` of a class-conditional UNet.
#[derive(Debug, Clone)]
enum ClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)`: integer labels.
    Table(Embedding, usize),
    /// `TimestepEmbedding` of `time_proj(labels)`.
    Timestep(TimestepEmbedding),
    /// `nn.Identity`: labels are `(b, time_embed_dim)` vectors.
    Identity,
}

/// diffusers' `UNet2DModel`: predicts noise (or `v`, or `x_0`, as it was trained) from a noisy
/// sample `x_t` and its timestep `t`.
#[derive(Debug, Clone)]
pub struct UNet2DModel {
    config: UNet2DConfig,
    conv_in: Conv2d,
    time_proj: TimeProjection,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<UNetMidBlock2D>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    device: Device,
}

impl UNet2DModel {
    /// Builds the model for `cfg`, taking its weights from `vb` under diffusers' names
    /// (`conv_in.weight`, `down_blocks.0.resnets.0.norm1.weight`, ...). The model computes in
    /// `vb`'s dtype and device.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use ddim::unet::{UNet2DConfig, UNet2DModel};
    ///
    /// let (cfg, _) = UNet2DConfig::from_json_str(
    ///     r#"{"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": null,
    ///         "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    ///         "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}"#,
    /// )?;
    /// let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let unet = UNet2DModel::new(&cfg, vb)?;
    /// let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu)?;
    /// let eps = unet.forward(&x, &Tensor::new(999u32, &Device::Cpu)?, None)?;
    /// assert_eq!(eps.dims(), &[2, 3, 8, 8]);
    /// # Ok::<(), ddim::Error>(())
    /// ```
    pub fn new(cfg: &UNet2DConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let channels = &cfg.block_out_channels;
        let (c0, n) = (channels[0], channels.len());
        let temb = cfg.time_embed_dim();
        let conv_in = conv3x3(cfg.in_channels, c0, 1, 1, vb.pp("conv_in"))?;

        let time_vb = vb.pp("time_proj");
        let (time_proj, time_in) = match cfg.time_embedding_type {
            TimeEmbeddingType::Positional => {
                let p = Timesteps::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift, vb.device())?;
                (TimeProjection::Positional(p), c0)
            }
            TimeEmbeddingType::Fourier => (
                TimeProjection::Fourier(GaussianFourierProjection::new(c0, time_vb)?),
                2 * c0,
            ),
            TimeEmbeddingType::Learned => {
                let rows = cfg.num_train_timesteps.unwrap_or(0);
                (TimeProjection::Learned(embedding(rows, c0, time_vb)?), c0)
            }
        };
        let time_embedding = TimestepEmbedding::new(time_in, temb, vb.pp("time_embedding"))?;
        let class_vb = vb.pp("class_embedding");
        let class_embedding = match (cfg.class_embed_type, cfg.num_class_embeds) {
            (None, None) => None,
            (None, Some(classes)) => Some(ClassEmbedding::Table(
                embedding(classes, temb, class_vb)?,
                classes,
            )),
            (Some(ClassEmbedType::Timestep), _) => Some(ClassEmbedding::Timestep(
                TimestepEmbedding::new(time_in, temb, class_vb)?,
            )),
            (Some(ClassEmbedType::Identity), _) => Some(ClassEmbedding::Identity),
        };

        let s = ResnetSettings {
            temb_channels: temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            act: cfg.act_fn,
            time_scale_shift: cfg.resnet_time_scale_shift,
            output_scale_factor: 1.0,
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, &kind) in cfg.down_block_types.iter().enumerate() {
            let cin = if i == 0 { c0 } else { channels[i - 1] };
            let vb = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::new(
                kind,
                cin,
                channels[i],
                i == n - 1,
                cfg,
                s,
                vb,
            )?);
        }
        let mid_block = match cfg.mid_block_type {
            None => None,
            Some(MidBlockType::UNetMidBlock2D) => {
                let s = ResnetSettings {
                    output_scale_factor: cfg.mid_block_scale_factor,
                    ..s
                };
                Some(UNetMidBlock2D::new(
                    channels[n - 1],
                    cfg,
                    s,
                    vb.pp("mid_block"),
                )?)
            }
        };
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        for (i, &kind) in cfg.up_block_types.iter().enumerate() {
            let prev_cout = if i == 0 { reversed[0] } else { reversed[i - 1] };
            let skip_cin = reversed[(i + 1).min(n - 1)];
            let vb = vb.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::new(
                kind,
                prev_cout,
                reversed[i],
                skip_cin,
                i == n - 1,
                cfg,
                s,
                vb,
            )?);
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3x3(c0, cfg.out_channels, 1, 1, vb.pp("conv_out"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The number of parameters of the UNet `cfg` describes, found by building it over a
    /// backend that records shapes and allocates nothing (each tensor is one zero, broadcast).
    pub fn parameter_count(cfg: &UNet2DConfig) -> Result<usize> {
        let counter = ShapeCounter::default();
        let total = counter.total.clone();
        let vb = VarBuilder::from_backend(Box::new(counter), DType::F32, Device::Cpu);
        UNet2DModel::new(cfg, vb)?;
        let n = *total.lock().map_err(|_| {
            Error::Candle(candle_core::Error::Msg("parameter count poisoned".into()))
        })?;
        Ok(n)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DConfig {
        &self.config
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One forward pass, like diffusers' `UNet2DModel.forward(sample, timestep, class_labels).sample`.
    ///
    /// - `x`: the noisy sample, `(b, in_channels, h, w)`, `h` and `w` multiples of
    ///   [`UNet2DConfig::spatial_divisor`]; converted to the model's dtype.
    /// - `t`: timesteps, a scalar, `(1,)` or `(b,)`, of any dtype (integers or floats).
    /// - `class_labels`: required exactly when the model is class-conditional. Integer labels
    ///   (scalar, `(1,)` or `(b,)`) for `num_class_embeds`, timesteps for `class_embed_type =
    ///   "timestep"`, `(b, time_embed_dim)` vectors for `"identity"`.
    ///
    /// Returns `(b, out_channels, h, w)` in the model's dtype.
    pub fn forward(&self, x: &Tensor, t: &Tensor, class_labels: Option<&Tensor>) -> Result<Tensor> {
        let b = self.check_sample(x)?;
        let x = x.to_dtype(self.dtype)?;
        let x = if self.config.center_input_sample {
            x.affine(2.0, -1.0)? // 2 x - 1
        } else {
            x
        };

        // 1. time (and class) embedding, (b, time_embed_dim)
        let t = self.per_sample("t", t, b)?;
        let t_emb = self.project_time("t", &t)?.to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(class_emb) = self.embed_classes(class_labels, b)? {
            emb = emb.broadcast_add(&class_emb)?;
        }

        // 2. down, keeping every intermediate for the skip connections
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, &mut skips)?;
        }
        // 3. middle
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb)?;
        }
        // 4. up, consuming the skips from the deepest one
        for block in &self.up_blocks {
            h = block.forward(&h, &emb, &mut skips)?;
        }
        // 5. out
        let h = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&h)?)?;
        match self.config.time_embedding_type {
            // diffusers divides the output by the (Fourier, i.e. sigma) timestep
            TimeEmbeddingType::Fourier => {
                Ok(h.broadcast_div(&t.to_dtype(self.dtype)?.reshape((b, 1, 1, 1))?)?)
            }
            _ => Ok(h),
        }
    }

    /// Makes what the first forward pass on `batch` images of `height × width` would make on its
    /// way, all at once and in parallel: the Winograd transforms of the 3×3 weights (kept for
    /// later passes; see [`crate::ops::winograd`]). Sampling calls it before its first step; it
    /// does nothing where a transform exists, and on devices and dtypes without one.
    ///
    /// Writing the transforms is mostly first touches of fresh memory (about 200 MiB for the
    /// cifar10-32 UNet), so this is the place for it: the model's load, as ONNX Runtime packs
    /// its weights when it creates a session, rather than the first step.
    pub fn prepare(&self, batch: usize, height: usize, width: usize) {
        use rayon::prelude::*;
        self.convs((height, width))
            .par_iter()
            .for_each(|(conv, (h, w))| conv.prepare(batch, *h, *w));
    }

    /// Makes every convolution's Winograd products run in bf16 with f32 sums (CPUs with
    /// AVX512-BF16; the weights and activations stay f32), before the first forward pass.
    /// Passed to the model rather than set globally, so two models in one process may differ.
    pub fn use_bf16_products(&self) -> Result<()> {
        for (conv, _) in self.convs((1, 1)) {
            conv.use_bf16_products()?;
        }
        Ok(())
    }

    /// For each convolution, in forward order, the points of the Winograd transform it keeps
    /// (16 for F(2×2, 3×3), 36 for F(4×4, 3×3)), or `None` (im2col + GEMM, or not run yet).
    pub fn winograd_points(&self) -> Vec<Option<usize>> {
        self.convs((1, 1))
            .iter()
            .map(|(conv, _)| conv.winograd_points())
            .collect()
    }

    /// The model's convolutions with the height and width of their inputs for an input of
    /// `h × w`, in forward order.
    pub(crate) fn convs(&self, size: (usize, usize)) -> ConvSizes<'_> {
        let mut out = vec![(&self.conv_in, size)];
        let mut size = size;
        for block in &self.down_blocks {
            size = block.convs(size, &mut out);
        }
        if let Some(mid) = &self.mid_block {
            mid.convs(size, &mut out);
        }
        for block in &self.up_blocks {
            size = block.convs(size, &mut out);
        }
        out.push((&self.conv_out, size));
        out
    }

    /// Checks `x` is `(b, in_channels, h, w)` with `h`, `w` multiples of the spatial divisor; returns `b`.
    fn check_sample(&self, x: &Tensor) -> Result<usize> {
        let dims = x.dims();
        let d = self.config.spatial_divisor();
        let &[b, c, h, w] = dims else {
            return Err(Error::argument(
                "x",
                format!("shape {dims:?}"),
                "expected a (batch, channels, height, width) tensor",
            ));
        };
        if b == 0 || c != self.config.in_channels {
            return Err(Error::argument(
                "x",
                format!("shape {dims:?}"),
                format!(
                    "expected a non-empty batch of {} channels",
                    self.config.in_channels
                ),
            ));
        }
        if h == 0 || w == 0 || h % d != 0 || w % d != 0 {
            return Err(Error::argument(
                "x",
                format!("shape {dims:?}"),
                format!("height and width must be positive multiples of {d} (2 ^ number of downsamplers)"),
            ));
        }
        Ok(b)
    }

    /// A scalar, `(1,)` or `(b,)` tensor as `(b,)` f32 on the model's device.
    fn per_sample(&self, name: &str, values: &Tensor, b: usize) -> Result<Tensor> {
        let values = match values.dims() {
            [] => values.reshape(1)?,
            [n] if *n == 1 || *n == b => values.clone(),
            dims => {
                return Err(Error::argument(
                    name,
                    format!("shape {dims:?}"),
                    format!("expected a scalar, (1,) or (batch,) = ({b},) tensor"),
                ))
            }
        };
        Ok(values
            .to_dtype(DType::F32)?
            .to_device(&self.device)?
            .broadcast_as(b)?
            .contiguous()?)
    }

    /// `time_proj(t)` for `(b,)` f32 timesteps, after checking them against the projection's domain.
    fn project_time(&self, name: &str, t: &Tensor) -> Result<Tensor> {
        match &self.time_proj {
            TimeProjection::Positional(_) => {}
            TimeProjection::Fourier(_) => {
                if let Some(v) = t
                    .to_vec1::<f32>()?
                    .into_iter()
                    .find(|v| v.is_nan() || *v <= 0.0)
                {
                    return Err(Error::argument(
                        name,
                        v,
                        "the Fourier time embedding takes log(t): expected t > 0",
                    ));
                }
            }
            TimeProjection::Learned(_) => {
                check_indices(name, t, self.config.num_train_timesteps.unwrap_or(0))?
            }
        }
        self.time_proj.forward(t)
    }

    /// The class embedding to add to the time embedding, `(1 or b, time_embed_dim)`.
    fn embed_classes(&self, labels: Option<&Tensor>, b: usize) -> Result<Option<Tensor>> {
        let (embedding, labels) = match (&self.class_embedding, labels) {
            (None, None) => return Ok(None),
            (None, Some(_)) => {
                return Err(Error::argument(
                    "class_labels",
                    "Some(..)",
                    "this model has no class embedding (num_class_embeds and class_embed_type are null); pass None",
                ))
            }
            (Some(_), None) => {
                return Err(Error::argument(
                    "class_labels",
                    "None",
                    "this model is class-conditional: pass class labels",
                ))
            }
            (Some(e), Some(l)) => (e, l),
        };
        let emb = match embedding {
            ClassEmbedding::Table(table, classes) => {
                let labels = self.per_sample("class_labels", labels, b)?;
                check_indices("class_labels", &labels, *classes)?;
                table.forward(&labels.to_dtype(DType::U32)?)?
            }
            ClassEmbedding::Timestep(time_embedding) => {
                let labels = self.per_sample("class_labels", labels, b)?;
                let projected = self.project_time("class_labels", &labels)?;
                time_embedding.forward(&projected.to_dtype(self.dtype)?)?
            }
            ClassEmbedding::Identity => {
                let width = self.config.time_embed_dim();
                match labels.dims() {
                    [n, w] if (*n == 1 || *n == b) && *w == width => {
                        labels.to_dtype(self.dtype)?.to_device(&self.device)?
                    }
                    dims => {
                        return Err(Error::argument(
                            "class_labels",
                            format!("shape {dims:?}"),
                            format!("identity class embedding: expected (batch, {width}) vectors"),
                        ))
                    }
                }
            }
        };
        Ok(Some(emb.to_dtype(self.dtype)?))
    }
}

/// Checks that `(n,)` f32 `values` are integers in `0..count` (rows of an embedding table).
fn check_indices(name: &str, values: &Tensor, count: usize) -> Result<()> {
    for v in values.to_vec1::<f32>()? {
        if !(v >= 0.0 && v.fract() == 0.0 && (v as usize) < count) {
            return Err(Error::argument(
                name,
                v,
                format!("expected an integer in 0..{count}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(extra: &str) -> UNet2DModel {
        let json = format!(
            r#"{{"block_out_channels": [4, 8], "norm_num_groups": 2, "attention_head_dim": null,
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D"] {extra}}}"#
        );
        let (cfg, _) = UNet2DConfig::from_json_str(&json).unwrap();
        UNet2DModel::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap()
    }

    fn x(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    fn arg_error(result: Result<Tensor>, name: &str) -> String {
        match result {
            Err(e @ Error::InvalidArgument { .. }) if e.to_string().contains(name) => e.to_string(),
            other => panic!("expected an invalid `{name}`, got {other:?}"),
        }
    }

    #[test]
    fn timesteps_scalar_one_or_batch() {
        let unet = tiny("");
        let dev = Device::Cpu;
        for t in [
            Tensor::new(5u32, &dev).unwrap(),
            Tensor::new(&[5i64], &dev).unwrap(),
            Tensor::new(&[5f32, 6.5], &dev).unwrap(),
        ] {
            let out = unet.forward(&x(&[2, 3, 8, 8]), &t, None).unwrap();
            assert_eq!(out.dims(), &[2, 3, 8, 8]);
        }
        let t = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
        arg_error(unet.forward(&x(&[2, 3, 8, 8]), &t, None), "t");
    }

    #[test]
    fn bad_sample_shapes() {
        let unet = tiny("");
        let t = Tensor::new(1u32, &Device::Cpu).unwrap();
        let msg = arg_error(unet.forward(&x(&[1, 3, 8, 7]), &t, None), "x");
        assert!(msg.contains("multiples of 2"), "{msg}");
        arg_error(unet.forward(&x(&[1, 4, 8, 8]), &t, None), "x");
        arg_error(unet.forward(&x(&[3, 8, 8]), &t, None), "x");
    }

    #[test]
    fn class_labels_must_match_the_model() {
        let dev = Device::Cpu;
        let t = Tensor::new(1u32, &dev).unwrap();
        let labels = Tensor::new(&[3u32], &dev).unwrap();
        let plain = tiny("");
        arg_error(
            plain.forward(&x(&[1, 3, 8, 8]), &t, Some(&labels)),
            "class_labels",
        );
        let conditional = tiny(r#", "num_class_embeds": 4"#);
        arg_error(
            conditional.forward(&x(&[1, 3, 8, 8]), &t, None),
            "class_labels",
        );
        conditional
            .forward(&x(&[1, 3, 8, 8]), &t, Some(&labels))
            .unwrap();
        let out_of_range = Tensor::new(&[4u32], &dev).unwrap();
        let msg = arg_error(
            conditional.forward(&x(&[1, 3, 8, 8]), &t, Some(&out_of_range)),
            "class_labels",
        );
        assert!(msg.contains("0..4"), "{msg}");
    }

    #[test]
    fn time_domains_of_fourier_and_learned() {
        let dev = Device::Cpu;
        let fourier = tiny(r#", "time_embedding_type": "fourier""#);
        let zero = Tensor::new(0f32, &dev).unwrap();
        arg_error(fourier.forward(&x(&[1, 3, 8, 8]), &zero, None), "t");
        let learned = tiny(r#", "time_embedding_type": "learned", "num_train_timesteps": 10"#);
        let t = Tensor::new(10u32, &dev).unwrap();
        arg_error(learned.forward(&x(&[1, 3, 8, 8]), &t, None), "t");
        let t = Tensor::new(2.5f32, &dev).unwrap();
        arg_error(learned.forward(&x(&[1, 3, 8, 8]), &t, None), "t");
    }
}
