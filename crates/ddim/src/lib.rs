//! `ddim`: DDIM (Song, Meng, Ermon 2020, arXiv:2010.02502) and DDPM (Ho et al. 2020,
//! arXiv:2006.11239) diffusion sampling on candle, compatible with diffusers model folders.

pub mod error;
pub mod loader;
pub mod unet;

pub use error::{Error, Result, WeightProblem};
