//! The geometry of one convolution (input, kernel, stride, padding, output size), checked
//! once; shared by the direct and the Winograd convolutions.

use candle_core::Result;

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) b: usize,
    pub(crate) c_in: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c_out: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geometry {
    /// The geometry of `x` (b, c, h, w) convolved with `w` (o, c, kh, kw); an error names what
    /// does not fit.
    pub(crate) fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[b, c_in, h, wd], &[c_out, c_in_w, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected (b, c, h, w) input and (o, c, kh, kw) weight, got {x:?} and {w:?}")
        };
        if c_in != c_in_w {
            candle_core::bail!("conv2d: input has {c_in} channels, weight expects {c_in_w}")
        }
        if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} (stride {stride}, padding {padding}) does not fit input {h}x{wd}")
        }
        Ok(Geometry {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            stride,
            padding,
            ho: (h + 2 * padding - kh) / stride + 1,
            wo: (wd + 2 * padding - kw) / stride + 1,
        })
    }
}
