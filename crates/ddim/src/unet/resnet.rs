//! `ResnetBlock2D` of diffusers' `models/resnet.py`, with `Downsample2D` (`models/downsampling.py`)
//! and `Upsample2D` (`models/upsampling.py`) as the UNet2D blocks use them.

use candle_core::{Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use crate::ops::{add_planes, Conv2d, GroupNorm};

use super::config::{Activation, ResnetTimeScaleShift};
use crate::Result;

impl Activation {
    /// Applies the activation elementwise.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Silu => crate::ops::silu(xs),
            Activation::Mish => candle_nn::ops::mish(xs),
            Activation::Gelu => xs.gelu_erf(),
            Activation::Relu => xs.relu(),
        }
    }
}

/// `act(norm(x))`, fused for SiLU.
fn norm_act(norm: &GroupNorm, act: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => norm.forward_silu(x),
        _ => act.forward(&norm.forward(x)?),
    }
}

/// A 3x3 convolution with padding 1 (`nn.Conv2d(cin, cout, kernel_size=3, padding=1)`).
pub(crate) fn conv3x3(
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d::new(cin, cout, 3, stride, padding, vb)?)
}

/// `Downsample2D(channels, use_conv=True, padding=p, name="op")`: a stride-2 3x3 convolution
/// (weights `conv`). With `padding = 0`, the input is first padded by one on the right and bottom.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// A downsampler of `channels` -> `channels` with the given conv `padding`.
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 2, padding, vb.pp("conv"))?,
            padding,
        })
    }
}

impl Downsample2D {
    /// Adds its convolution with its input size to `out`; returns the output size.
    pub(crate) fn convs<'a>(
        &'a self,
        (h, w): (usize, usize),
        out: &mut super::ConvSizes<'a>,
    ) -> (usize, usize) {
        let pad = usize::from(self.padding == 0);
        out.push((&self.conv, (h + pad, w + pad)));
        (h / 2, w / 2)
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.padding == 0 {
            // F.pad(x, (0, 1, 0, 1)): one zero column on the right, one zero row at the bottom.
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D(channels, use_conv=True)`: nearest-neighbour x2, then a 3x3 convolution (weights `conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// An upsampler of `channels` -> `channels`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 1, 1, vb.pp("conv"))?,
        })
    }
}

/// Nearest-neighbour upsampling by 2 (`F.interpolate(x, scale_factor=2.0, mode="nearest")`).
fn upsample_nearest_x2(xs: &Tensor) -> candle_core::Result<Tensor> {
    crate::ops::upsample_nearest_2x(xs)
}

impl Upsample2D {
    /// Adds its convolution with its input size to `out`; returns the output size.
    pub(crate) fn convs<'a>(
        &'a self,
        (h, w): (usize, usize),
        out: &mut super::ConvSizes<'a>,
    ) -> (usize, usize) {
        out.push((&self.conv, (2 * h, 2 * w)));
        (2 * h, 2 * w)
    }
}

impl Module for Upsample2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&upsample_nearest_x2(xs)?)
    }
}

/// Whether a resnet changes resolution (`up=True` / `down=True` in diffusers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Same resolution.
    Same,
    /// `down=True`: 2x2 average pooling of both paths after `norm1`.
    Down,
    /// `up=True`: nearest x2 of both paths after `norm1`.
    Up,
}

/// The settings shared by all resnets of a UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// `temb_channels`: width of the time embedding.
    pub temb_channels: usize,
    /// `groups` of both GroupNorms.
    pub groups: usize,
    /// `eps` of both GroupNorms.
    pub eps: f64,
    /// `non_linearity`.
    pub act: Activation,
    /// `time_embedding_norm`.
    pub time_scale_shift: ResnetTimeScaleShift,
    /// `output_scale_factor`: the residual sum is divided by it.
    pub output_scale_factor: f64,
}

/// diffusers' `ResnetBlock2D` (pre-norm, no FIR kernel, `skip_time_act=False`):
/// `(shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) [+ temb]))) / output_scale_factor`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    resample: Resample,
    settings: ResnetSettings,
}

impl ResnetBlock2D {
    /// A resnet from `cin` to `cout` channels; `conv_shortcut` (1x1) exists when they differ.
    pub fn new(
        cin: usize,
        cout: usize,
        resample: Resample,
        s: ResnetSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let temb_out = match s.time_scale_shift {
            ResnetTimeScaleShift::Default => cout,
            ResnetTimeScaleShift::ScaleShift => 2 * cout,
        };
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(s.groups, cin, s.eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(s.temb_channels, temb_out, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(s.groups, cout, s.eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            resample,
            settings: s,
        })
    }

    /// Adds its convolutions with their input sizes to `out` for an input of `h × w`; returns
    /// the output size.
    pub(crate) fn convs<'a>(
        &'a self,
        (h, w): (usize, usize),
        out: &mut super::ConvSizes<'a>,
    ) -> (usize, usize) {
        let size = match self.resample {
            Resample::Same => (h, w),
            Resample::Down => (h / 2, w / 2),
            Resample::Up => (2 * h, 2 * w),
        };
        out.extend([(&self.conv1, size), (&self.conv2, size)]);
        if let Some(conv) = &self.conv_shortcut {
            out.push((conv, size));
        }
        size
    }

    /// `xs`: (b, cin, h, w); `temb`: (b, temb_channels). Returns (b, cout, h', w').
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let act = self.settings.act;
        let h = norm_act(&self.norm1, act, xs)?;
        let (input, h) = match self.resample {
            Resample::Same => (xs.clone(), h),
            Resample::Down => (xs.avg_pool2d(2)?, h.avg_pool2d(2)?),
            Resample::Up => (upsample_nearest_x2(xs)?, upsample_nearest_x2(&h)?),
        };
        let h = self.conv1.forward(&h)?;
        // (b, temb) -> (b, cout or 2 cout, 1, 1)
        let temb = self
            .time_emb_proj
            .forward(&act.forward(temb)?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = match self.settings.time_scale_shift {
            ResnetTimeScaleShift::Default => norm_act(&self.norm2, act, &add_planes(&h, &temb)?)?,
            ResnetTimeScaleShift::ScaleShift => {
                let half = temb.dim(1)? / 2;
                let (scale, shift) = (temb.narrow(1, 0, half)?, temb.narrow(1, half, half)?);
                // norm2(h) * (1 + scale) + shift
                let h = self
                    .norm2
                    .forward(&h)?
                    .broadcast_mul(&(scale + 1.0)?)?
                    .broadcast_add(&shift)?;
                act.forward(&h)?
            }
        };
        let h = self.conv2.forward(&h)?;
        let input = match &self.conv_shortcut {
            Some(conv) => conv.forward(&input)?,
            None => input,
        };
        let out = (input + h)?;
        if self.settings.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.settings.output_scale_factor)?)
        }
    }
}
