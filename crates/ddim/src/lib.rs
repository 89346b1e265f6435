//! `ddim`: DDIM (Song, Meng, Ermon 2020, arXiv:2010.02502) and DDPM (Ho et al. 2020,
//! arXiv:2006.11239) diffusion sampling on candle, compatible with diffusers model folders.
//!
//! The schedulers match diffusers 0.42 numerically (see [`scheduler`]); noise comes from
//! generators the caller owns (see [`rng`]).
//!
//! On the CPU, call [`configure_cpu_threads`] first thing in `main`, as the `ddim` binary does.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddim::scheduler::{DDIMScheduler, DdimStepOptions, SchedulerConfig};
//!
//! let mut scheduler = DDIMScheduler::new(&SchedulerConfig::default())?;
//! scheduler.set_timesteps(10)?;
//! let mut x = Tensor::ones((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu)?;
//! for &t in scheduler.timesteps() {
//!     let eps = (&x * 0.1)?; // a stand-in for the model's ε̂(x_t, t)
//!     x = scheduler.step(&eps, t, &x, &DdimStepOptions::with_eta(0.0), None)?.prev_sample;
//! }
//! assert_eq!(x.dims(), &[1, 3, 8, 8]);
//! # Ok::<(), ddim::Error>(())
//! ```

pub mod atomic;
pub mod error;
#[cfg(feature = "eval")]
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "hub")]
pub mod hub;
#[cfg(feature = "image")]
pub mod image_io;
pub mod json;
pub mod loader;
pub mod npy;
pub mod ops;
pub mod pipeline;
pub mod pth;
pub mod rng;
pub mod run_record;
pub mod schedule;
pub mod scheduler;
pub mod train;
pub mod unet;

pub use error::{Error, ErrorKind, Result, WeightProblem};

/// Sets up the CPU thread pools the way the `ddim` binary runs. Call it at the start of `main`,
/// before any other thread or tensor exists; later calls change nothing.
///
/// - Our kernels and candle's matrix products run on rayon's global pool, but candle 0.11 runs
///   its element-wise ops (unary ones, and binary ones of 64 Ki elements or more, such as a
///   UNet's residual additions) on a second pool of `CANDLE_NUM_THREADS - 1` workers, which
///   spin for 25,000 rounds after every op before they sleep. On 2 cores that spinning took a
///   core from rayon's pool after every residual addition (10% of a batch-1 sampling profile).
///   Unless `CANDLE_NUM_THREADS` is set, it is set to 1: no extra workers, those ops run on the
///   calling thread, and every value stays the same.
/// - The calling thread becomes one of rayon's global pool threads (`RAYON_NUM_THREADS` or the
///   core count in all), so that the sequential work between parallel sections does not compete
///   for a core with a full pool of spinning workers.
pub fn configure_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Fails only when the pool exists already; then it is used as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .use_current_thread()
        .build_global();
}
