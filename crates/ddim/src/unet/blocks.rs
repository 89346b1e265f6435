//! The blocks of diffusers' `models/unets/unet_2d_blocks.py` that `UNet2DModel` uses: `DownBlock2D`,
//! `AttnDownBlock2D`, `ResnetDownsampleBlock2D`, `UNetMidBlock2D`, `UpBlock2D`, `AttnUpBlock2D`,
//! `ResnetUpsampleBlock2D`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::config::{DownBlockType, ResampleType, ResnetTimeScaleShift, UNet2DConfig, UpBlockType};
use super::resnet::{Downsample2D, Resample, ResnetBlock2D, ResnetSettings, Upsample2D};
use crate::{Error, Result};

/// `downsamplers.0` of a down block.
#[derive(Debug, Clone)]
pub enum Downsampler {
    /// `Downsample2D`: a stride-2 convolution.
    Conv(Downsample2D),
    /// `ResnetBlock2D(down=True)`.
    Resnet(Box<ResnetBlock2D>),
}

/// `upsamplers.0` of an up block.
#[derive(Debug, Clone)]
pub enum Upsampler {
    /// `Upsample2D`: nearest x2 and a convolution.
    Conv(Upsample2D),
    /// `ResnetBlock2D(up=True)`.
    Resnet(Box<ResnetBlock2D>),
}

/// Adds the convolutions of `resnets`, run one after the other on an input of `size`, to
/// `out`; returns the output size.
fn resnet_convs<'a>(
    resnets: &'a [ResnetBlock2D],
    size: (usize, usize),
    out: &mut super::ConvSizes<'a>,
) -> (usize, usize) {
    resnets
        .iter()
        .fold(size, |size, resnet| resnet.convs(size, out))
}

/// One encoder block. `DownBlock2D`, `AttnDownBlock2D` and `ResnetDownsampleBlock2D` differ only
/// in whether `attentions` exist and in the kind of `downsamplers.0`, so one type serves all three.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty, or one per resnet (`AttnDownBlock2D`).
    attentions: Vec<Attention>,
    downsampler: Option<Downsampler>,
}

impl DownBlock {
    /// Block `kind` from `cin` to `cout` channels; the last block (`is_final`) does not downsample.
    pub fn new(
        kind: DownBlockType,
        cin: usize,
        cout: usize,
        is_final: bool,
        cfg: &UNet2DConfig,
        s: ResnetSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(cfg.layers_per_block);
        let mut attentions = Vec::new();
        for i in 0..cfg.layers_per_block {
            let resnet_in = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::new(
                resnet_in,
                cout,
                Resample::Same,
                s,
                vb.pp("resnets").pp(i),
            )?);
            if kind == DownBlockType::AttnDownBlock2D {
                let head_dim = cfg.attention_head_dim.unwrap_or(cout);
                let vb = vb.pp("attentions").pp(i);
                attentions.push(Attention::new(
                    cout,
                    head_dim,
                    Some(s.groups),
                    s.eps,
                    1.0,
                    vb,
                )?);
            }
        }
        let resample = match kind {
            DownBlockType::DownBlock2D => ResampleType::Conv,
            DownBlockType::AttnDownBlock2D => cfg.downsample_type,
            DownBlockType::ResnetDownsampleBlock2D => ResampleType::Resnet,
        };
        let vb = vb.pp("downsamplers").pp(0);
        let downsampler = match (is_final, resample) {
            (true, _) => None,
            (false, ResampleType::Conv) => Some(Downsampler::Conv(Downsample2D::new(
                cout,
                cfg.downsample_padding,
                vb,
            )?)),
            (false, ResampleType::Resnet) => Some(Downsampler::Resnet(Box::new(
                ResnetBlock2D::new(cout, cout, Resample::Down, s, vb)?,
            ))),
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Adds its convolutions with their input sizes to `out` for an input of `h × w`; returns
    /// the output size.
    pub(crate) fn convs<'a>(
        &'a self,
        size: (usize, usize),
        out: &mut super::ConvSizes<'a>,
    ) -> (usize, usize) {
        let size = resnet_convs(&self.resnets, size, out);
        match &self.downsampler {
            None => size,
            Some(Downsampler::Conv(conv)) => conv.convs(size, out),
            Some(Downsampler::Resnet(resnet)) => resnet.convs(size, out),
        }
    }

    /// Runs the block on `xs` (b, cin, h, w) and pushes each resnet's (and the downsampler's)
    /// output onto `skips` for the up blocks.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = match down {
                Downsampler::Conv(conv) => conv.forward(&h)?,
                Downsampler::Resnet(resnet) => resnet.forward(&h, temb)?,
            };
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// diffusers' `UNetMidBlock2D` with one layer: resnet, attention (unless `add_attention` is
/// false), resnet. Its residual sums are divided by `mid_block_scale_factor`.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: [ResnetBlock2D; 2],
    attention: Option<Attention>,
}

impl UNetMidBlock2D {
    /// The middle block at `channels`; `s.output_scale_factor` should be `mid_block_scale_factor`.
    pub fn new(
        channels: usize,
        cfg: &UNet2DConfig,
        s: ResnetSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        // attn_norm_num_groups, else norm_num_groups for "default" resnets and no norm for "scale_shift".
        let attn_groups = match (cfg.attn_norm_num_groups, s.time_scale_shift) {
            (Some(g), _) => Some(g),
            (None, ResnetTimeScaleShift::Default) => Some(s.groups),
            (None, ResnetTimeScaleShift::ScaleShift) => None,
        };
        let attention = if cfg.add_attention {
            let head_dim = cfg.attention_head_dim.unwrap_or(channels);
            let vb = vb.pp("attentions").pp(0);
            Some(Attention::new(
                channels,
                head_dim,
                attn_groups,
                s.eps,
                s.output_scale_factor,
                vb,
            )?)
        } else {
            None
        };
        let resnet = |i: usize| {
            ResnetBlock2D::new(
                channels,
                channels,
                Resample::Same,
                s,
                vb.pp("resnets").pp(i),
            )
        };
        Ok(Self {
            resnets: [resnet(0)?, resnet(1)?],
            attention,
        })
    }

    /// Adds its convolutions with their input sizes to `out` for an input of `h × w`.
    pub(crate) fn convs<'a>(&'a self, size: (usize, usize), out: &mut super::ConvSizes<'a>) {
        resnet_convs(&self.resnets, size, out);
    }

    /// (b, c, h, w) -> (b, c, h, w).
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(xs, temb)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnets[1].forward(&h, temb)
    }
}

/// One decoder block. `UpBlock2D`, `AttnUpBlock2D` and `ResnetUpsampleBlock2D` differ only in
/// whether `attentions` exist and in the kind of `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty, or one per resnet (`AttnUpBlock2D`).
    attentions: Vec<Attention>,
    upsampler: Option<Upsampler>,
}

impl UpBlock {
    /// Block `kind` with `layers_per_block + 1` resnets. `prev_cout`: channels coming from the
    /// block below; `cout`: this block's output; `skip_cin`: channels of the last skip it takes
    /// (the encoder block one level up). The last block (`is_final`) does not upsample.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: UpBlockType,
        prev_cout: usize,
        cout: usize,
        skip_cin: usize,
        is_final: bool,
        cfg: &UNet2DConfig,
        s: ResnetSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = cfg.layers_per_block + 1;
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { skip_cin } else { cout };
            let resnet_in = if i == 0 { prev_cout } else { cout };
            resnets.push(ResnetBlock2D::new(
                resnet_in + skip,
                cout,
                Resample::Same,
                s,
                vb.pp("resnets").pp(i),
            )?);
            if kind == UpBlockType::AttnUpBlock2D {
                let head_dim = cfg.attention_head_dim.unwrap_or(cout);
                let vb = vb.pp("attentions").pp(i);
                attentions.push(Attention::new(
                    cout,
                    head_dim,
                    Some(s.groups),
                    s.eps,
                    1.0,
                    vb,
                )?);
            }
        }
        let resample = match kind {
            UpBlockType::UpBlock2D => ResampleType::Conv,
            UpBlockType::AttnUpBlock2D => cfg.upsample_type,
            UpBlockType::ResnetUpsampleBlock2D => ResampleType::Resnet,
        };
        let vb = vb.pp("upsamplers").pp(0);
        let upsampler =
            match (is_final, resample) {
                (true, _) => None,
                (false, ResampleType::Conv) => Some(Upsampler::Conv(Upsample2D::new(cout, vb)?)),
                (false, ResampleType::Resnet) => Some(Upsampler::Resnet(Box::new(
                    ResnetBlock2D::new(cout, cout, Resample::Up, s, vb)?,
                ))),
            };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Adds its convolutions with their input sizes to `out` for an input of `h × w`; returns
    /// the output size.
    pub(crate) fn convs<'a>(
        &'a self,
        size: (usize, usize),
        out: &mut super::ConvSizes<'a>,
    ) -> (usize, usize) {
        let size = resnet_convs(&self.resnets, size, out);
        match &self.upsampler {
            None => size,
            Some(Upsampler::Conv(conv)) => conv.convs(size, out),
            Some(Upsampler::Resnet(resnet)) => resnet.convs(size, out),
        }
    }

    /// Runs the block on `xs`, concatenating one skip from the end of `skips` (popped) before each resnet.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                Error::argument(
                    "skips",
                    0,
                    "an up block ran out of skip connections (inconsistent block lists)",
                )
            })?;
            // (b, c, h, w) ++ (b, c_skip, h, w) along channels
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h)?;
            }
        }
        match &self.upsampler {
            None => Ok(h),
            Some(Upsampler::Conv(conv)) => Ok(conv.forward(&h)?),
            Some(Upsampler::Resnet(resnet)) => resnet.forward(&h, temb),
        }
    }
}
