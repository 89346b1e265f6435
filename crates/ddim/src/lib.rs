//! `ddim`: DDIM (Song, Meng, Ermon 2020, arXiv:2010.02502) and DDPM (Ho et al. 2020,
//! arXiv:2006.11239) diffusion sampling on candle, compatible with diffusers model folders.
//!
//! The schedulers match diffusers 0.42 numerically (see [`scheduler`]); noise comes from
//! generators the caller owns (see [`rng`]).
//!
//! On the CPU, our kernels and candle's matrix products run on rayon's thread pool, while
//! candle 0.11 runs its element-wise ops on a second pool whose workers spin after every op.
//! Programs that sample on few cores should set `CANDLE_NUM_THREADS=1` before their first
//! tensor op, as the `ddim` binary does (10% faster at batch 1 on 2 cores; same values).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddim::scheduler::{DDIMScheduler, SchedulerConfig};
//!
//! let mut scheduler = DDIMScheduler::new(&SchedulerConfig::default())?;
//! scheduler.set_timesteps(10)?;
//! let mut x = Tensor::ones((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu)?;
//! for &t in scheduler.timesteps() {
//!     let eps = (&x * 0.1)?; // a stand-in for the model's ε̂(x_t, t)
//!     x = scheduler.step(&eps, t, &x, 0.0, false, None)?.prev_sample;
//! }
//! assert_eq!(x.dims(), &[1, 3, 8, 8]);
//! # Ok::<(), ddim::Error>(())
//! ```

pub mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod image_io;
pub mod loader;
pub mod npy;
pub mod ops;
pub mod pipeline;
pub mod pth;
pub mod rng;
pub mod schedule;
pub mod scheduler;
pub mod train;
pub mod unet;

pub use error::{Error, Result, WeightProblem};
