//! The sampling loop ([`denoise`]), the only place where the model and a scheduler meet (DDIM
//! eq. 12): `for t in timesteps { ε̂ = unet(x_t, t); x_t = scheduler.step(ε̂, t, x_t) }`, as
//! diffusers' `DDIMPipeline` / `DDPMPipeline` run it. Sampling, DDIM inversion (x_0 -> x_T) and
//! every sampler behind [`Scheduler`] run this one loop; spherical interpolation between two x_T
//! (DDIM paper, Sec. 5.3) feeds it; SDEdit ([`sdedit`]) enters it part of the way down.

use candle_core::{DType, Device, Tensor};

use crate::rng::{ImageStream, TorchGenerator};
use crate::scheduler::{
    DDIMInverseScheduler, DDPMScheduler, DdimStepOptions, Scheduler, SchedulerConfig,
    SchedulerKind, StepOutput,
};
use crate::unet::UNet2DModel;
use crate::{Error, Result};

/// Where the noise of a run comes from: x_T first, then each step's noise, in diffusers' order.
#[derive(Clone, Debug)]
pub enum Generator {
    /// ddim's default: image i of the batch draws from its own stream
    /// `ImageStream::new(seed, first_index + i)`, so an image does not depend on the batch size
    /// or on how a run is split.
    PerImage {
        /// One stream per image of the batch.
        streams: Vec<ImageStream>,
    },
    /// `torch.Generator().manual_seed(seed)`: each draw covers the whole batch, as diffusers'
    /// `randn_tensor` does, so a run reproduces diffusers' noise exactly.
    Torch(Box<TorchGenerator>),
}

impl Generator {
    /// Per-image streams for images `first_index .. first_index + batch` of a run seeded `seed`.
    pub fn per_image(seed: u64, first_index: u64, batch: usize) -> Self {
        Generator::PerImage {
            streams: (0..batch as u64)
                .map(|i| ImageStream::new(seed, first_index + i))
                .collect(),
        }
    }

    /// A torch-compatible generator seeded like `torch.Generator().manual_seed(seed)`.
    pub fn torch(seed: u64) -> Self {
        Generator::Torch(Box::new(TorchGenerator::new(seed)))
    }

    /// Standard normal noise of shape `dims` (float32) on `device`.
    pub fn randn(&mut self, dims: &[usize], device: &Device) -> Result<Tensor> {
        let numel: usize = dims.iter().product();
        let data = match self {
            Generator::Torch(g) => g.randn(numel),
            Generator::PerImage { streams } => {
                let b = dims.first().copied().unwrap_or(1);
                if b != streams.len() {
                    return Err(Error::argument(
                        "noise shape",
                        format!("{dims:?}"),
                        format!(
                            "the first dimension must be the batch of {} images",
                            streams.len()
                        ),
                    ));
                }
                let per = numel / b.max(1);
                let mut data = vec![0f32; numel];
                for (chunk, stream) in data.chunks_mut(per.max(1)).zip(streams.iter_mut()) {
                    stream.fill_normal(chunk);
                }
                data
            }
        };
        Ok(Tensor::from_vec(data, dims, device)?)
    }
}

/// The settings of one sampling run.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// The sampler: the scheduler class whose step runs (the config is converted to it as
    /// diffusers' `from_config` does).
    pub sampler: SchedulerKind,
    /// N, the number of inference steps.
    pub num_inference_steps: usize,
    /// DDIM's η (ignored by DDPM).
    pub eta: f64,
    /// DDIM: re-derive ε̂ from the clipped x̂0 (GLIDE).
    pub use_clipped_model_output: bool,
    /// Class labels for class-conditional models, one per image (or one for all).
    pub class_labels: Option<Tensor>,
}

impl Default for SampleOptions {
    /// diffusers' `DDIMPipeline` defaults: DDIM, 50 steps, eta 0.
    fn default() -> Self {
        SampleOptions {
            sampler: SchedulerKind::Ddim,
            num_inference_steps: 50,
            eta: 0.0,
            use_clipped_model_output: false,
            class_labels: None,
        }
    }
}

/// What a step callback sees.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// The step's index, from 0.
    pub index: usize,
    /// The number of steps of the run.
    pub num_steps: usize,
    /// The model's timestep input at this step.
    pub timestep: f64,
    /// x_t, the sample the model saw.
    pub sample: &'a Tensor,
    /// The sample after the step.
    pub prev_sample: &'a Tensor,
    /// x̂0 predicted at this step.
    pub pred_original_sample: &'a Tensor,
}

impl<'a> StepInfo<'a> {
    /// What a callback sees after step `index` of `num_steps` at timestep `t` turned `sample`
    /// into `step`.
    fn after(
        index: usize,
        num_steps: usize,
        timestep: f64,
        sample: &'a Tensor,
        step: &'a StepOutput,
    ) -> Self {
        StepInfo {
            index,
            num_steps,
            timestep,
            sample,
            prev_sample: &step.prev_sample,
            pred_original_sample: &step.pred_original_sample,
        }
    }
}

/// A callback that does nothing, for runs that need none.
pub fn no_callback(_: &StepInfo) -> Result<()> {
    Ok(())
}

/// The model's ε̂ (or x̂0, v̂) at timestep `t`, with the first `channels` channels kept when the
/// model also predicts a variance (2·C outputs) and the sampler does not use it.
fn model_output(
    unet: &UNet2DModel,
    x: &Tensor,
    t: f64,
    class_labels: Option<&Tensor>,
) -> Result<Tensor> {
    let t = Tensor::new(t as f32, x.device())?;
    let out = unet.forward(x, &t, class_labels)?;
    Ok(out.to_dtype(DType::F32)?)
}

fn keep_channels(out: Tensor, channels: usize) -> Result<Tensor> {
    if out.dim(1)? == 2 * channels {
        Ok(out.narrow(1, 0, channels)?.contiguous()?)
    } else {
        Ok(out)
    }
}

/// The shape of x_T for `batch` images of the model: (b, in_channels, height, width) from the
/// config's `sample_size`.
pub fn noise_shape(unet: &UNet2DModel, batch: usize) -> Result<[usize; 4]> {
    let c = unet.config();
    let (h, w) = c.sample_size.ok_or_else(|| {
        Error::config(
            "sample_size",
            "null",
            "the unet config must give sample_size to sample from it",
        )
    })?;
    Ok([batch, c.in_channels, h, w])
}

/// The sampler `options` choose, its timesteps set: DDIM with their η, or DDPM.
pub fn scheduler_for(
    scheduler_config: &SchedulerConfig,
    options: &SampleOptions,
) -> Result<Box<dyn Scheduler>> {
    crate::scheduler::build(
        scheduler_config,
        options.sampler,
        options.num_inference_steps,
        DdimStepOptions {
            eta: options.eta,
            use_clipped_model_output: options.use_clipped_model_output,
        },
    )
}

/// Samples from x_T: DDIM (`eta` per step) or DDPM, drawing every later noise from
/// `generator` in diffusers' order (DDIM: one draw per step when eta > 0; DDPM: one per step
/// with t > 0). Returns x_0 in model space ([-1, 1], unclipped, float32).
pub fn sample(
    unet: &UNet2DModel,
    scheduler_config: &SchedulerConfig,
    options: &SampleOptions,
    x_t: Tensor,
    generator: &mut Generator,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    let mut scheduler = scheduler_for(scheduler_config, options)?;
    let labels = options.class_labels.as_ref();
    denoise(
        unet,
        scheduler.as_mut(),
        x_t,
        labels,
        Some(generator),
        callback,
    )
}

/// The sampling loop, the one every sampler and inversion run (DDIM eq. 12 for DDIM):
///
/// ```text
/// x = x_start · init_noise_sigma
/// for i, t in timesteps: out = unet(scale_model_input(x, i), t); x = step(out, i, x, z_i)
/// ```
///
/// where z_i is drawn from `generator` for the steps that take noise, in diffusers' order. The
/// callback sees every step (the progress bar, trajectories and previews are callbacks).
pub fn denoise(
    unet: &UNet2DModel,
    scheduler: &mut dyn Scheduler,
    x_start: Tensor,
    class_labels: Option<&Tensor>,
    generator: Option<&mut Generator>,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    denoise_from(
        unet,
        scheduler,
        x_start,
        0,
        class_labels,
        generator,
        callback,
    )
}

/// [`denoise`] from step `start` of the scheduler's timesteps: `x_start` is x at that step's
/// timestep (and is not scaled by `init_noise_sigma` when `start > 0`).
pub fn denoise_from(
    unet: &UNet2DModel,
    scheduler: &mut dyn Scheduler,
    x_start: Tensor,
    start: usize,
    class_labels: Option<&Tensor>,
    generator: Option<&mut Generator>,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    let channels = x_start.dim(1)?;
    prepare(unet, &x_start);
    let variance = scheduler.uses_model_variance();
    let mut model = |x: &Tensor, t: f64| -> Result<Tensor> {
        let out = model_output(unet, x, t, class_labels)?;
        if variance {
            Ok(out)
        } else {
            keep_channels(out, channels)
        }
    };
    run_loop(&mut model, scheduler, x_start, start, generator, callback)
}

/// [`denoise`] with any model: `model(x, t)` is the model's output on x at timestep t.
pub fn denoise_with(
    model: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    scheduler: &mut dyn Scheduler,
    x_start: Tensor,
    generator: Option<&mut Generator>,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    run_loop(model, scheduler, x_start, 0, generator, callback)
}

/// The loop itself, from step `start`.
fn run_loop(
    model: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    scheduler: &mut dyn Scheduler,
    x_start: Tensor,
    start: usize,
    mut generator: Option<&mut Generator>,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    let mut x = x_start.to_dtype(DType::F32)?;
    let sigma = scheduler.init_noise_sigma();
    if sigma != 1.0 && start == 0 {
        x = x.affine(sigma, 0.0)?;
    }
    let timesteps = scheduler.model_timesteps();
    for (index, &t) in timesteps.iter().enumerate().skip(start) {
        let input = scheduler.scale_model_input(&x, index)?;
        let out = model(&input, t)?;
        let z = match (scheduler.needs_noise(index), generator.as_deref_mut()) {
            (false, _) => None,
            (true, Some(g)) => Some(g.randn(x.dims(), x.device())?),
            (true, None) => {
                return Err(Error::argument(
                    "generator",
                    "None",
                    format!("step {index} (t = {t}) adds noise: give a generator"),
                ))
            }
        };
        let step = scheduler.step(&out, index, &x, z.as_ref())?;
        callback(&StepInfo::after(index, timesteps.len(), t, &x, &step))?;
        x = step.prev_sample;
    }
    Ok(x)
}

/// SDEdit (Meng et al. 2022, [arXiv:2108.01073](https://arxiv.org/abs/2108.01073)) as diffusers'
/// img2img pipelines run it: `strength` of the `num_inference_steps` are run, the last
/// `int(steps · strength)` ones, from `init` (x_0, NCHW in [-1, 1]) noised by the DDPM forward
/// process to the first of them (`add_noise`, with noise drawn from `generator` before any step's
/// noise). Strength 1 starts from the first timestep, 0.5 skips the first half of the steps.
/// DDIM and DDPM only: the other samplers' noise lives in sigma space or carries history.
pub fn sdedit(
    unet: &UNet2DModel,
    scheduler_config: &SchedulerConfig,
    options: &SampleOptions,
    init: &Tensor,
    strength: f64,
    generator: &mut Generator,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::argument(
            "strength",
            strength,
            "a number in (0, 1]: the share of the steps run from the noised image",
        ));
    }
    if !matches!(options.sampler, SchedulerKind::Ddim | SchedulerKind::Ddpm) {
        return Err(Error::argument(
            "sampler",
            options.sampler.class_name(),
            "DDIMScheduler or DDPMScheduler for an init image (SDEdit noises it with the DDPM \
             forward process)",
        ));
    }
    let n = options.num_inference_steps;
    let mut scheduler = scheduler_for(scheduler_config, options)?;
    let timesteps = scheduler.model_timesteps();
    // diffusers: init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    let run = ((n as f64 * strength) as usize).min(timesteps.len());
    if run == 0 {
        return Err(Error::argument(
            "strength",
            strength,
            format!("at least one step to run: {n} steps × strength {strength} < 1"),
        ));
    }
    let start = timesteps.len() - run;
    let noise = generator.randn(init.dims(), init.device())?;
    let t = timesteps[start] as usize;
    let x = DDPMScheduler::new(scheduler_config)?.add_noise(
        &init.to_dtype(DType::F32)?,
        &noise,
        &[t],
    )?;
    let labels = options.class_labels.as_ref();
    denoise_from(
        unet,
        scheduler.as_mut(),
        x,
        start,
        labels,
        Some(generator),
        callback,
    )
}

/// [`UNet2DModel::prepare`] for batches shaped like `x`.
fn prepare(unet: &UNet2DModel, x: &Tensor) {
    if let &[b, _, h, w] = x.dims() {
        unet.prepare(b, h, w);
    }
}

/// DDIM inversion: runs the deterministic DDIM update forwards from a clean x_0 to x_T with
/// [`DDIMInverseScheduler`], visiting the same timesteps as a DDIM run of
/// `num_inference_steps` (ascending). Sampling the result with DDIM at eta = 0 and the same
/// steps reconstructs x_0 up to the discretisation error.
pub fn invert(
    unet: &UNet2DModel,
    scheduler_config: &SchedulerConfig,
    x0: &Tensor,
    num_inference_steps: usize,
    class_labels: Option<&Tensor>,
    callback: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<Tensor> {
    let mut scheduler = DDIMInverseScheduler::new(scheduler_config)?;
    scheduler.set_timesteps(num_inference_steps)?;
    denoise(
        unet,
        &mut scheduler,
        x0.clone(),
        class_labels,
        None,
        callback,
    )
}

/// Spherical interpolation between two noise tensors of the same shape (DDIM paper, Sec. 5.3,
/// after White 2016): `sin((1-α)θ)/sin θ · a + sin(αθ)/sin θ · b` with θ the angle between them.
/// Falls back to linear interpolation when a and b are (nearly) parallel.
pub fn slerp(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::argument(
            "b",
            format!("a tensor of shape {:?}", b.dims()),
            format!("must have a's shape {:?}", a.dims()),
        ));
    }
    if !(alpha.is_finite()) {
        return Err(Error::argument("alpha", alpha, "must be a finite number"));
    }
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()? as f64;
    let na = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    let nb = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    let cos = (dot / (na * nb)).clamp(-1.0, 1.0);
    let theta = cos.acos();
    let (wa, wb) = if theta.sin().abs() < 1e-6 {
        (1.0 - alpha, alpha)
    } else {
        (
            ((1.0 - alpha) * theta).sin() / theta.sin(),
            (alpha * theta).sin() / theta.sin(),
        )
    };
    Ok((a.affine(wa, 0.0)? + b.affine(wb, 0.0)?)?)
}

/// `frames` noise tensors on the great circle from `a` to `b` (both ends included), stacked
/// along the batch dimension: (frames · b, c, h, w).
pub fn interpolation_noise(a: &Tensor, b: &Tensor, frames: usize) -> Result<Tensor> {
    if frames < 2 {
        return Err(Error::argument(
            "frames",
            frames,
            "must be at least 2 (the two ends)",
        ));
    }
    let zs = (0..frames)
        .map(|k| slerp(a, b, k as f64 / (frames - 1) as f64))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&zs, 0)?)
}

/// RePaint's settings (Lugmayr et al. 2022, [arXiv:2201.09865](https://arxiv.org/abs/2201.09865);
/// diffusers' `RePaintPipeline` defaults: 250 steps, jumps of 10, 10 resamplings, η = 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RepaintOptions {
    /// Denoising steps of the schedule before jumps.
    pub num_inference_steps: usize,
    /// Steps gone back up at each jump.
    pub jump_length: usize,
    /// Times each jump point is passed (1: no resampling).
    pub jump_n_sample: usize,
    /// DDIM's η of the denoising steps.
    pub eta: f64,
}

impl Default for RepaintOptions {
    fn default() -> Self {
        RepaintOptions {
            num_inference_steps: 250,
            jump_length: 10,
            jump_n_sample: 10,
            eta: 0.0,
        }
    }
}

/// RePaint's walk over the timesteps (diffusers' `RePaintScheduler.set_timesteps`): down one
/// step at a time, and at every `jump_length`-th step below the top, back up `jump_length`
/// steps, `jump_n_sample - 1` times. A step down is a denoising step; a step up re-noises.
pub fn repaint_timesteps(
    options: &RepaintOptions,
    num_train_timesteps: usize,
) -> Result<Vec<usize>> {
    let n = options.num_inference_steps;
    if n == 0 || n > num_train_timesteps {
        return Err(Error::argument(
            "num_inference_steps",
            n,
            format!("between 1 and the {num_train_timesteps} training timesteps"),
        ));
    }
    if options.jump_length == 0 || options.jump_n_sample == 0 {
        return Err(Error::argument(
            "jump_length / jump_n_sample",
            format!("{} / {}", options.jump_length, options.jump_n_sample),
            "at least 1 each",
        ));
    }
    if !(options.eta.is_finite() && options.eta >= 0.0) {
        return Err(Error::argument("eta", options.eta, "a finite number >= 0"));
    }
    let mut jumps = std::collections::HashMap::new();
    let mut j = 0;
    while j + options.jump_length < n {
        jumps.insert(j, options.jump_n_sample - 1);
        j += options.jump_length;
    }
    let mut out = Vec::new();
    let mut t = n;
    while t >= 1 {
        t -= 1;
        out.push(t);
        if let Some(left) = jumps.get_mut(&t).filter(|left| **left > 0) {
            *left -= 1;
            for _ in 0..options.jump_length {
                t += 1;
                out.push(t);
            }
        }
    }
    let stride = num_train_timesteps / n;
    Ok(out.into_iter().map(|t| t * stride).collect())
}

/// RePaint inpainting as diffusers' `RePaintPipeline` + `RePaintScheduler` run it: from x_T drawn
/// by `generator`, every step down is DDIM's update (with `eta`) of the unknown part, while the
/// known part (where `mask` is 1) is `image` noised to the new level by the forward process
/// (with a fresh draw, the one the step's variance uses); every step up re-noises by the betas.
/// `image` is NCHW in [-1, 1]; `mask` (1 or N, 1, H, W) is 1 where the image is kept and 0 where
/// it is repainted. The last step keeps the image exactly where the mask is 1. `callback(i, n)`
/// runs after each of the n walk steps.
pub fn repaint(
    unet: &UNet2DModel,
    scheduler_config: &SchedulerConfig,
    options: &RepaintOptions,
    image: &Tensor,
    mask: &Tensor,
    generator: &mut Generator,
    callback: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Tensor> {
    let train = scheduler_config.num_train_timesteps;
    let walk = repaint_timesteps(options, train)?;
    let ddpm = DDPMScheduler::new(scheduler_config)?;
    let (ac, betas) = (ddpm.alphas_cumprod().to_vec(), ddpm.betas().to_vec());
    let image = image.to_dtype(DType::F32)?;
    let dims = image.dims().to_vec();
    let mask = mask.to_dtype(DType::F32)?.broadcast_as(dims.as_slice())?;
    let keep_out = mask.affine(-1.0, 1.0)?;
    let channels = dims[1];
    prepare(unet, &image);
    let stride = train / options.num_inference_steps;
    let mut x = generator.randn(&dims, image.device())?;
    let mut t_last = walk[0] + 1;
    for (i, &t) in walk.iter().enumerate() {
        if t < t_last {
            let out = keep_channels(model_output(unet, &x, t as f64, None)?, channels)?;
            let a_t = ac[t] as f64;
            let a_prev = if t >= stride {
                ac[t - stride] as f64
            } else {
                1.0
            };
            let mut x0 = ((&x - out.affine((1.0 - a_t).sqrt(), 0.0)?)? / a_t.sqrt())?;
            if scheduler_config.clip_sample {
                let r = scheduler_config.clip_sample_range;
                x0 = x0.clamp(-r, r)?;
            }
            let noise = generator.randn(&dims, image.device())?;
            let variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
            let std = options.eta * variance.max(0.0).sqrt();
            let mut unknown = (x0.affine(a_prev.sqrt(), 0.0)?
                + out.affine((1.0 - a_prev - std * std).max(0.0).sqrt(), 0.0)?)?;
            if t > 0 && options.eta > 0.0 {
                unknown = (unknown + noise.affine(std, 0.0)?)?;
            }
            let known =
                (image.affine(a_prev.sqrt(), 0.0)? + noise.affine((1.0 - a_prev).sqrt(), 0.0)?)?;
            x = ((known * &mask)? + (unknown * &keep_out)?)?;
        } else {
            for k in 0..stride {
                let beta = betas[t_last + k] as f64;
                let noise = generator.randn(&dims, image.device())?;
                x = (x.affine((1.0 - beta).sqrt(), 0.0)? + noise.affine(beta.sqrt(), 0.0)?)?;
            }
        }
        t_last = t;
        callback(i, walk.len())?;
    }
    Ok(x)
}
