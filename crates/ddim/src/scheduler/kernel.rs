//! The update shared by the DDIM, DDPM and DDIM-inverse steps, as one fused pass over memory:
//!
//! ```text
//! (x̂0, ε̂) = from the model output and x_t, by prediction type   (DDIM eq. 12, first term)
//! x̂0'     = clip(x̂0) or threshold(x̂0)
//! ε̂'      = (x_t - sqrt(ᾱ_t) x̂0') / sqrt(1 - ᾱ_t)   if use_clipped_model_output
//! x_prev   = c_x0 · x̂0' + c_eps · ε̂' + c_x · x_t + σ · z
//! ```
//!
//! On the CPU with contiguous float32 tensors this is a single loop that reads the model output,
//! the sample and the noise once and writes x_prev and x̂0 once (split over threads); on other
//! devices and dtypes it falls back to candle tensor operations with the same arithmetic.

use candle_core::{DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::config::PredictionType;
use crate::{Error, Result};

/// How x̂0 is bounded before it is used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Clip {
    /// x̂0 is used as predicted.
    None,
    /// `clamp(x̂0, -r, r)` (`clip_sample`).
    Range(f32),
    /// Dynamic thresholding: `clamp(x̂0, -s_i, s_i) / s_i` with `s_i` from the
    /// `ratio`-quantile of |x̂0| of image i, clamped to [1, max] (Imagen, Saharia et al. 2022).
    Dynamic {
        /// `dynamic_thresholding_ratio`.
        ratio: f32,
        /// `sample_max_value`.
        max: f32,
    },
}

/// The per-step scalars of the fused update; see the module docs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepCoefficients {
    pub prediction: PredictionType,
    /// sqrt(ᾱ_t)
    pub sqrt_alpha_prod: f32,
    /// sqrt(1 - ᾱ_t)
    pub sqrt_beta_prod: f32,
    pub clip: Clip,
    pub use_clipped_model_output: bool,
    pub c_x0: f32,
    pub c_eps: f32,
    pub c_x: f32,
    /// σ_t, multiplying the noise when there is noise.
    pub noise_std: f32,
}

impl StepCoefficients {
    /// (x̂0, ε̂) from the model output `m` and the sample `x`, as diffusers writes them.
    #[inline(always)]
    fn predict(&self, m: f32, x: f32) -> (f32, f32) {
        let (sa, sb) = (self.sqrt_alpha_prod, self.sqrt_beta_prod);
        match self.prediction {
            PredictionType::Epsilon => ((x - sb * m) / sa, m),
            PredictionType::Sample => (m, (x - sa * m) / sb),
            PredictionType::VPrediction => (sa * x - sb * m, sa * m + sb * x),
        }
    }

    /// One element of the update, given the clip bounds of its image.
    #[inline(always)]
    fn update(&self, m: f32, x: f32, z: f32, bound: f32, div: f32) -> (f32, f32) {
        let (x0, eps) = self.predict(m, x);
        let x0 = if div == 1.0 {
            x0.clamp(-bound, bound)
        } else {
            x0.clamp(-bound, bound) / div
        };
        let eps = if self.use_clipped_model_output {
            (x - self.sqrt_alpha_prod * x0) / self.sqrt_beta_prod
        } else {
            eps
        };
        let prev = self.c_x0 * x0 + self.c_eps * eps + self.c_x * x + self.noise_std * z;
        (prev, x0)
    }
}

/// Applies the fused update. `noise` (same shape as `sample`) is required when `noise_std != 0`.
/// Returns `(prev_sample, pred_original_sample)`.
pub(crate) fn fused_step(
    k: &StepCoefficients,
    model_output: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    check_same_shape("model_output", model_output, sample)?;
    if let Some(z) = noise {
        check_same_shape("variance_noise", z, sample)?;
    }
    if sample.rank() == 0 {
        return Err(Error::argument(
            "sample",
            "a scalar",
            "a batched tensor (b, ...) is expected",
        ));
    }
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if cpu_f32(model_output) && cpu_f32(sample) && noise.is_none_or(cpu_f32) {
        fused_step_cpu(k, model_output, sample, noise)
    } else {
        fused_step_tensor(k, model_output, sample, noise)
    }
}

fn check_same_shape(name: &str, t: &Tensor, sample: &Tensor) -> Result<()> {
    if t.dims() != sample.dims() {
        return Err(Error::argument(
            name,
            format!("a tensor of shape {:?}", t.dims()),
            format!("must have the sample's shape {:?}", sample.dims()),
        ));
    }
    Ok(())
}

/// The float32 data of a contiguous CPU tensor's storage.
fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(&cpu.as_slice::<f32>()?[start..end]),
        _ => Err(Error::Candle(candle_core::Error::Msg(
            "internal: expected a contiguous float32 CPU tensor".into(),
        ))),
    }
}

/// Work is split into pieces of at most this many elements, never across two images.
const CHUNK: usize = 1 << 15;

fn fused_step_cpu(
    k: &StepCoefficients,
    model_output: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let dims = sample.dims().to_vec();
    let n = sample.elem_count();
    let batch = dims[0].max(1);
    let item_len = n / batch;
    let mut prev = vec![0f32; n];
    let mut x0 = vec![0f32; n];
    let (m_storage, m_layout) = model_output.storage_and_layout();
    let m = cpu_slice(&m_storage, m_layout)?;
    let (x_storage, x_layout) = sample.storage_and_layout();
    let x = cpu_slice(&x_storage, x_layout)?;
    let z_guard = noise.map(|z| z.storage_and_layout());
    let z = match &z_guard {
        Some((storage, layout)) => Some(cpu_slice(storage, layout)?),
        None => None,
    };
    // Per-image (bound, divisor) of the clip.
    let bounds: Vec<(f32, f32)> = match k.clip {
        Clip::None => vec![(f32::INFINITY, 1.0); batch],
        Clip::Range(r) => vec![(r, 1.0); batch],
        Clip::Dynamic { ratio, max } => {
            // A first pass computes x̂0 itself, for the quantile of each image.
            x0.par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(x.par_chunks(CHUNK)))
                .for_each(|(o, (m, x))| {
                    for ((o, &m), &x) in o.iter_mut().zip(m).zip(x) {
                        *o = k.predict(m, x).0;
                    }
                });
            x0.chunks(item_len.max(1))
                .map(|img| {
                    let s = dynamic_threshold(img, ratio, max);
                    (s, s)
                })
                .collect()
        }
    };
    spans(&mut prev, &mut x0, item_len)
        .into_par_iter()
        .for_each(|(start, img, p, o)| {
            let (bound, div) = bounds[img];
            let end = start + p.len();
            let (m, x) = (&m[start..end], &x[start..end]);
            match z {
                Some(z) => {
                    let z = &z[start..end];
                    for i in 0..p.len() {
                        (p[i], o[i]) = k.update(m[i], x[i], z[i], bound, div);
                    }
                }
                None => {
                    for i in 0..p.len() {
                        (p[i], o[i]) = k.update(m[i], x[i], 0.0, bound, div);
                    }
                }
            }
        });
    let prev = Tensor::from_vec(prev, dims.as_slice(), &Device::Cpu)?;
    let x0 = Tensor::from_vec(x0, dims.as_slice(), &Device::Cpu)?;
    Ok((prev, x0))
}

/// Splits two equal-length outputs into pieces of at most [`CHUNK`] elements that do not cross
/// image boundaries: (start offset, image index, prev piece, x0 piece).
#[allow(clippy::type_complexity)]
fn spans<'a>(
    prev: &'a mut [f32],
    x0: &'a mut [f32],
    item_len: usize,
) -> Vec<(usize, usize, &'a mut [f32], &'a mut [f32])> {
    let mut out = Vec::new();
    let (mut p_rest, mut o_rest) = (prev, x0);
    let mut start = 0;
    while !p_rest.is_empty() {
        let img = start / item_len.max(1);
        let img_end = (img + 1) * item_len.max(1);
        let len = CHUNK.min(img_end - start).min(p_rest.len());
        let (p, pr) = p_rest.split_at_mut(len);
        let (o, or) = o_rest.split_at_mut(len);
        out.push((start, img, p, o));
        p_rest = pr;
        o_rest = or;
        start += len;
    }
    out
}

/// The dynamic-thresholding bound of one image: the `ratio`-quantile of |x̂0| clamped to
/// [1, max]. A NaN image gets `max` (the clamp would otherwise see a NaN bound).
pub(crate) fn dynamic_threshold(img: &[f32], ratio: f32, max: f32) -> f32 {
    let s = abs_quantile(img, ratio);
    if s.is_nan() {
        max
    } else {
        s.clamp(1.0, max)
    }
}

/// `torch.quantile(|v|, q)` with linear interpolation, in float32 like torch.
pub(crate) fn abs_quantile(v: &[f32], q: f32) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    a.sort_unstable_by(|x, y| x.total_cmp(y));
    let rank = q * (a.len() - 1) as f32;
    let below = (rank.floor() as usize).min(a.len() - 1);
    let above = (rank.ceil() as usize).min(a.len() - 1);
    let w = rank - below as f32;
    let (lo, hi) = (a[below], a[above]);
    // torch.lerp
    if w < 0.5 {
        lo + w * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - w)
    }
}

/// x̂0 bounded as `clip` says, with tensor operations (any device; float32 or float64).
pub(crate) fn apply_clip(x0: Tensor, clip: Clip) -> Result<Tensor> {
    Ok(match clip {
        Clip::None => x0,
        Clip::Range(r) => x0.clamp(-r, r)?,
        Clip::Dynamic { ratio, max } => {
            let b = x0.dim(0)?;
            let flat: Vec<Vec<f32>> = x0
                .flatten_from(1)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec2()?;
            let s: Vec<f32> = flat
                .iter()
                .map(|img| dynamic_threshold(img, ratio, max))
                .collect();
            let mut shape = vec![1usize; x0.rank()];
            shape[0] = b;
            let s = Tensor::from_vec(s, shape, x0.device())?.to_dtype(x0.dtype())?;
            x0.broadcast_minimum(&s)?
                .broadcast_maximum(&s.neg()?)?
                .broadcast_div(&s)?
        }
    })
}

/// The same update with candle tensor operations (CUDA, Metal, other dtypes, strided inputs).
pub(crate) fn fused_step_tensor(
    k: &StepCoefficients,
    model_output: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let dtype = sample.dtype();
    let m = model_output.to_dtype(DType::F32)?;
    let x = sample.to_dtype(DType::F32)?;
    let (sa, sb) = (k.sqrt_alpha_prod as f64, k.sqrt_beta_prod as f64);
    let (x0, eps) = match k.prediction {
        PredictionType::Epsilon => (((&x - m.affine(sb, 0.0)?)? / sa)?, m.clone()),
        PredictionType::Sample => (m.clone(), ((&x - m.affine(sa, 0.0)?)? / sb)?),
        PredictionType::VPrediction => (
            (x.affine(sa, 0.0)? - m.affine(sb, 0.0)?)?,
            (m.affine(sa, 0.0)? + x.affine(sb, 0.0)?)?,
        ),
    };
    let x0 = apply_clip(x0, k.clip)?;
    let eps = if k.use_clipped_model_output {
        ((&x - x0.affine(sa, 0.0)?)? / sb)?
    } else {
        eps
    };
    let mut prev = (x0.affine(k.c_x0 as f64, 0.0)? + eps.affine(k.c_eps as f64, 0.0)?)?;
    if k.c_x != 0.0 {
        prev = (prev + x.affine(k.c_x as f64, 0.0)?)?;
    }
    if let Some(z) = noise {
        if k.noise_std != 0.0 {
            prev = (prev + z.to_dtype(DType::F32)?.affine(k.noise_std as f64, 0.0)?)?;
        }
    }
    Ok((prev.to_dtype(dtype)?, x0.to_dtype(dtype)?))
}
