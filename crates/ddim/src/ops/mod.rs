//! Fast CPU kernels for what candle 0.11 does slowly on the CPU, as candle custom ops with
//! forward and backward passes; on other devices and dtypes they fall back to candle's own ops.

pub mod conv;
pub mod elementwise;
pub mod group_norm;

pub use conv::{conv2d, Conv2d};
pub use elementwise::{silu, upsample_nearest_2x};
pub use group_norm::{group_norm, GroupNorm};
