//! Spatial self-attention of the UNet2D blocks: diffusers' `Attention` built with
//! `_from_deprecated_attn_block=True`, run by `AttnProcessor2_0` (`models/attention_processor.py`).

use candle_core::{Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use crate::ops::GroupNorm;

use crate::Result;

/// Multi-head self-attention over the `h * w` positions of a feature map, with a residual
/// connection: `(x + to_out(attention(group_norm(x)))) / rescale_output_factor`.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    rescale_output_factor: f64,
}

impl Attention {
    /// Attention over `channels` with `channels / head_dim` heads of width `head_dim`
    /// (`Attention(channels, heads=channels // head_dim, dim_head=head_dim, ...)`).
    /// `norm_groups = None` means no `group_norm` (the middle block with `scale_shift` resnets).
    pub fn new(
        channels: usize,
        head_dim: usize,
        norm_groups: Option<usize>,
        eps: f64,
        rescale_output_factor: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let heads = channels / head_dim.max(1);
        let inner = heads * head_dim;
        let group_norm = match norm_groups {
            Some(groups) => Some(GroupNorm::new(groups, channels, eps, vb.pp("group_norm"))?),
            None => None,
        };
        Ok(Self {
            group_norm,
            to_q: linear(channels, inner, vb.pp("to_q"))?,
            to_k: linear(channels, inner, vb.pp("to_k"))?,
            to_v: linear(channels, inner, vb.pp("to_v"))?,
            to_out: linear(inner, channels, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            rescale_output_factor,
        })
    }

    /// (b, n, heads * head_dim) -> (b, heads, n, head_dim).
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        xs.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// Softmax over the last dimension. candle's fused `softmax_last_dim` has no backward pass (it
/// is applied with `apply_op1_no_bwd`: in training, no gradient would reach `to_q` and `to_k`,
/// and what reaches the layers below would lack their share), so a tensor that autograd tracks
/// takes the composed form, `exp(x - max) / sum`, whose ops all have gradients; the max is a
/// constant shift that changes neither the result nor its gradient, so it is detached.
fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if !xs.track_op() {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    let dim = candle_core::D::Minus1;
    let max = xs.max_keepdim(dim)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(dim)?;
    num.broadcast_div(&den)
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(xs)?,
            None => xs.clone(),
        };
        // (b, c, h, w) -> (b, h*w, c). Made contiguous on purpose: in candle 0.11.1 the CPU
        // batched matmul of a transposed lhs with a broadcast rhs (what `Linear` does on 3-d
        // input) returns wrong values (huggingface/candle#3744, fix proposed in #3758); the
        // parity tests in `tests/unet_parity.rs` catch it.
        let hs = normed
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.split_heads(&self.to_q.forward(&hs)?)?;
        let k = self.split_heads(&self.to_k.forward(&hs)?)?;
        let v = self.split_heads(&self.to_v.forward(&hs)?)?;
        // softmax(q k^T / sqrt(head_dim)) v: (b, heads, n, n) @ (b, heads, n, d)
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let attn = softmax_last_dim(&scores)?.matmul(&v)?;
        // (b, heads, n, d) -> (b, n, heads * d) -> to_out -> (b, c, h, w)
        let attn = attn
            .transpose(1, 2)?
            .reshape((b, h * w, self.heads * self.head_dim))?;
        let out = self
            .to_out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        let out = (out + xs)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}
