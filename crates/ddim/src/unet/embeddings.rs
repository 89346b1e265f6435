//! Timestep embeddings of diffusers' `models/embeddings.py`: `Timesteps` (`get_timestep_embedding`),
//! `GaussianFourierProjection` and `TimestepEmbedding`, as `UNet2DModel` builds them.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Embedding, Linear, VarBuilder};

use crate::Result;

/// Sinusoidal embedding of diffusers' `get_timestep_embedding` with `scale = 1` and
/// `max_period = 10000`: `[sin(t * f_i), cos(t * f_i)]` with `f_i = exp(-ln(10000) * i / (half - shift))`.
#[derive(Debug, Clone)]
pub struct Timesteps {
    /// The frequencies `f_i`, `(half,)`, f32.
    freqs: Tensor,
    num_channels: usize,
    flip_sin_to_cos: bool,
}

impl Timesteps {
    /// An embedding of width `num_channels` (odd widths get a zero last column, as in diffusers).
    pub fn new(
        num_channels: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f64,
        device: &Device,
    ) -> Result<Self> {
        let half = num_channels / 2;
        // Follow torch's float32 arithmetic step by step so that `t * f_i` rounds the same way:
        // exponent = (-ln(max_period) as f32) * i, then / (half - shift) as f32, then exp.
        let log_period = -(10000f64.ln()) as f32;
        let denominator = (half as f64 - downscale_freq_shift) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((log_period * i as f32) / denominator).exp())
            .collect();
        Ok(Self {
            freqs: Tensor::from_vec(freqs, half, device)?,
            num_channels,
            flip_sin_to_cos,
        })
    }

    /// `(n,)` f32 timesteps -> `(n, num_channels)` f32.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        // (n, 1) * (1, half) -> (n, half)
        let args = t.unsqueeze(1)?.broadcast_mul(&self.freqs.unsqueeze(0)?)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        if self.num_channels % 2 == 1 {
            Ok(emb.pad_with_zeros(1, 0, 1)?)
        } else {
            Ok(emb)
        }
    }
}

/// diffusers' `GaussianFourierProjection` as `UNet2DModel` builds it (`log=True`,
/// `flip_sin_to_cos=False`): `[sin(2 pi log(t) w), cos(2 pi log(t) w)]` with the fixed random `weight`.
#[derive(Debug, Clone)]
pub struct GaussianFourierProjection {
    /// `weight`, `(embedding_size,)`.
    weight: Tensor,
}

impl GaussianFourierProjection {
    /// Loads `weight` of shape `(embedding_size,)`; the output is `2 * embedding_size` wide.
    pub fn new(embedding_size: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            embedding_size,
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 16.0,
            },
        )?;
        Ok(Self { weight })
    }

    /// `(n,)` positive f32 timesteps -> `(n, 2 * embedding_size)`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let weight = self.weight.to_dtype(DType::F32)?.unsqueeze(0)?;
        // Same order as torch: ((log(t)[:, None] * w[None, :]) * 2) * pi, all in f32.
        let proj = t.log()?.unsqueeze(1)?.broadcast_mul(&weight)?;
        let proj = ((proj * 2.0)? * std::f64::consts::PI)?;
        Ok(Tensor::cat(&[proj.sin()?, proj.cos()?], 1)?)
    }
}

/// What `time_proj` is: it turns `(n,)` timesteps into `(n, timestep_input_dim)` f32 vectors.
#[derive(Debug, Clone)]
pub enum TimeProjection {
    /// `Timesteps` (sinusoidal, no weights).
    Positional(Timesteps),
    /// `GaussianFourierProjection` (weight `time_proj.weight`).
    Fourier(GaussianFourierProjection),
    /// `nn.Embedding(num_train_timesteps, c)` (weight `time_proj.weight`); takes integer timesteps.
    Learned(Embedding),
}

impl TimeProjection {
    /// `(n,)` f32 timesteps -> `(n, timestep_input_dim)` f32. For `Learned`, the timesteps must
    /// already be checked to be integers in range.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            TimeProjection::Positional(p) => p.forward(t),
            TimeProjection::Fourier(p) => p.forward(t),
            TimeProjection::Learned(e) => {
                Ok(e.forward(&t.to_dtype(DType::U32)?)?.to_dtype(DType::F32)?)
            }
        }
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// `in_channels` -> `time_embed_dim` -> `time_embed_dim`, weights `linear_1`, `linear_2`.
    pub fn new(in_channels: usize, time_embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&crate::ops::silu(&self.linear_1.forward(xs)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula of diffusers' `get_timestep_embedding` evaluated in f64; the f32 result may
    /// differ by the rounding of `t * f_i` (about 1e-4 rad at t = 999). Exact parity with torch
    /// is checked by the fixtures in `tests/unet_parity.rs`.
    #[test]
    fn positional_matches_get_timestep_embedding_by_formula() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[0f32, 1., 999.], &dev).unwrap();
        for (flip, shift) in [(false, 1.0), (true, 0.0)] {
            let emb = Timesteps::new(8, flip, shift, &dev)
                .unwrap()
                .forward(&t)
                .unwrap();
            let emb: Vec<Vec<f32>> = emb.to_vec2().unwrap();
            for (row, &tv) in emb.iter().zip(&[0f64, 1., 999.]) {
                for i in 0..4 {
                    let f = (-(10000f64.ln()) * i as f64 / (4.0 - shift)).exp();
                    let (s, c) = ((tv * f).sin(), (tv * f).cos());
                    let (a, b) = if flip { (c, s) } else { (s, c) };
                    assert!((row[i] as f64 - a).abs() < 1e-3, "{row:?}");
                    assert!((row[i + 4] as f64 - b).abs() < 1e-3, "{row:?}");
                }
            }
        }
    }

    #[test]
    fn odd_width_is_zero_padded() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[3f32], &dev).unwrap();
        let emb = Timesteps::new(5, true, 1.0, &dev)
            .unwrap()
            .forward(&t)
            .unwrap();
        let emb: Vec<Vec<f32>> = emb.to_vec2().unwrap();
        assert_eq!(emb[0].len(), 5);
        assert_eq!(emb[0][4], 0.0);
    }
}
