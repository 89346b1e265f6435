//! `ddim serve`: a browser playground on a local HTTP server. One page, embedded in the binary
//! (no CDN, nothing downloaded), and a small JSON API:
//!
//! - `GET /` the page;
//! - `GET /api/info` the model (image shape, source), the samplers, the defaults and limits, and
//!   the job counters;
//! - `GET /api/sample?sampler=&steps=&eta=&seed=&n=` a run streamed as server-sent events: one
//!   `step` event per denoising step with every image's x_t and x̂0 as PNG data URLs, then
//!   `done` with the final images (or `error`). Closing the connection cancels the run.
//! - `POST /api/sample` the same with a JSON object of those keys, plus `init` (an image as a
//!   data URL) and `strength` for SDEdit from that image, or `noise` (x_T as base64 f32) to
//!   sample from a given x_T (an inverted image's, to decode it at other settings);
//! - `POST /api/invert` `{"image": data URL, "steps": 50}`: the image's DDIM inversion x_T, as
//!   base64 f32 (for `noise`) and as a preview;
//! - `POST /api/interpolate` `{"a": data URL, "b": data URL, "steps": 50, "frames": 8}`: both
//!   images inverted, the great circle between their x_T decoded at η = 0 (DDIM §5.3);
//! - `POST /api/inpaint` `{"image", "mask" (data URLs; white keeps), "steps", "jump_length",
//!   "jump_n_sample", "eta", "seed", "n"}`: RePaint, as `ddim inpaint`.
//!
//! A bad request gets HTTP 400 with `{"error": ..., "field": ...}` naming the parameter; a full
//! queue gets 429. Runs sample one at a time (the UNet uses every core), at most `--max-queue`
//! waiting or running.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use candle_core::Tensor;
use clap::Args;
use ddim::pipeline::{self, Generator, RepaintOptions, SampleOptions, StepInfo};
use ddim::scheduler::{SchedulerConfig, SchedulerKind};
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::common::{self, ComputeArgs, Model, ModelArgs, SamplerChoice};
use crate::UsageError;

const PAGE: &str = include_str!("page.html");

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// The most images one run may ask for.
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,
    /// The most steps one run may ask for.
    #[arg(long, default_value_t = 1000)]
    pub max_steps: usize,
    /// The most runs waiting or running at once; more get HTTP 429.
    #[arg(long, default_value_t = 4)]
    pub max_queue: usize,
}

/// What one run may ask for.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_images: usize,
    max_steps: usize,
    max_queue: usize,
}

/// The server's state, shared by every request.
struct Shared {
    model: Model,
    limits: Limits,
    /// One permit per run waiting or running.
    queue: Arc<Semaphore>,
    /// Held by the run that samples; the others wait for it.
    sampling: Mutex<()>,
    started: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
}

/// The largest request body (a JSON run with its init image) in bytes.
const MAX_BODY: usize = 1 << 20;

/// A run's settings after checking.
#[derive(Clone, Debug)]
struct SampleRequest {
    /// SDEdit's start image (1, c, h, w) and strength.
    init: Option<(Tensor, f64)>,
    /// x_T of every image, given (`noise`).
    noise: Option<Vec<f32>>,
    sampler: String,
    kind: SchedulerKind,
    config: SchedulerConfig,
    steps: usize,
    eta: f64,
    seed: u64,
    n: usize,
}

/// An HTTP error with a JSON body naming the parameter at fault.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn bad(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "field": self.field})),
        )
            .into_response()
    }
}

/// `ddim serve`: load the model, bind, serve until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    for (flag, v) in [
        ("--max-images", args.max_images),
        ("--max-steps", args.max_steps),
        ("--max-queue", args.max_queue),
    ] {
        if v == 0 {
            return Err(UsageError(format!("{flag} 0: must be at least 1")).into());
        }
    }
    let model = common::open_model(&args.model, None, &args.compute)?;
    pipeline::noise_shape(&model.unet, 1)?;
    let limits = Limits {
        max_images: args.max_images,
        max_steps: args.max_steps,
        max_queue: args.max_queue,
    };
    let shared = Arc::new(Shared {
        model,
        limits,
        queue: Arc::new(Semaphore::new(limits.max_queue)),
        sampling: Mutex::new(()),
        started: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (args.host.as_str(), args.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| {
            UsageError(format!(
                "--host {}: not an address or a host name this machine resolves",
                args.host
            ))
        })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    runtime.block_on(serve(shared, addr))
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/info", get(info))
        .route("/api/sample", get(sample).post(sample_post))
        .route("/api/invert", axum::routing::post(invert))
        .route("/api/interpolate", axum::routing::post(interpolate))
        .route("/api/inpaint", axum::routing::post(inpaint))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                field: None,
                message: "no such page; the API is GET /api/info and GET /api/sample".into(),
            }
        })
        .with_state(shared)
}

async fn serve(shared: Arc<Shared>, addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        UsageError(format!(
            "cannot listen on {addr}: {e} (is another server on that port? --port 0 picks a free \
             one)"
        ))
    })?;
    let local = listener.local_addr()?;
    eprintln!(
        "ddim serve: {} on http://{local} (Ctrl-C stops)",
        shared.model.source
    );
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    eprintln!("ddim serve: stopped");
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE))
}

async fn info(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let shape = pipeline::noise_shape(&shared.model.unet, 1).unwrap_or([1, 0, 0, 0]);
    let l = shared.limits;
    Json(json!({
        "model": shared.model.source,
        "image": {"channels": shape[1], "height": shape[2], "width": shape[3]},
        "samplers": ddim::scheduler::SAMPLER_NAMES.iter().map(|(name, _, _)| *name).collect::<Vec<_>>(),
        "defaults": {"sampler": "ddim", "steps": 50, "eta": 0.0, "seed": 0, "n": 4},
        "limits": {"max_images": l.max_images, "max_steps": l.max_steps, "max_queue": l.max_queue},
        "jobs": {
            "started": shared.started.load(Ordering::SeqCst),
            "finished": shared.finished.load(Ordering::SeqCst),
            "cancelled": shared.cancelled.load(Ordering::SeqCst),
            "failed": shared.failed.load(Ordering::SeqCst),
            "waiting_or_running": l.max_queue - shared.queue.available_permits(),
        },
    }))
}

/// Checks the query of `/api/sample`; every error names its parameter.
fn parse_request(
    query: &HashMap<String, String>,
    model: &Model,
    limits: Limits,
) -> Result<SampleRequest, ApiError> {
    const KNOWN: [&str; 8] = [
        "sampler", "steps", "eta", "seed", "n", "init", "strength", "noise",
    ];
    if let Some(key) = query.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad(
            key,
            format!(
                "unknown parameter `{key}`; /api/sample takes {}",
                KNOWN.join(", ")
            ),
        ));
    }
    fn num<T: std::str::FromStr>(
        query: &HashMap<String, String>,
        key: &str,
        default: T,
        what: &str,
    ) -> Result<T, ApiError> {
        match query.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| ApiError::bad(key, format!("{key}={v}: expected {what}"))),
        }
    }
    let steps: usize = num(query, "steps", 50, "a whole number of steps")?;
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::bad(
            "steps",
            format!("steps={steps}: must be between 1 and {}", limits.max_steps),
        ));
    }
    let shape =
        pipeline::noise_shape(&model.unet, 1).map_err(|e| ApiError::bad("n", e.to_string()))?;
    let per_image = shape[1] * shape[2] * shape[3];
    let noise = match query.get("noise") {
        None => None,
        Some(_) if query.contains_key("init") => {
            return Err(ApiError::bad("noise", "give noise (x_T) or init, not both"))
        }
        Some(b64) => Some(decode_f32s(b64, per_image)?),
    };
    let given_n = noise.as_ref().map_or(4, |v| v.len() / per_image);
    let n: usize = num(query, "n", given_n, "a whole number of images")?;
    if noise.is_some() && n != given_n {
        return Err(ApiError::bad(
            "n",
            format!("n={n}, but noise holds x_T for {given_n} image(s)"),
        ));
    }
    if n == 0 || n > limits.max_images {
        return Err(ApiError::bad(
            "n",
            format!("n={n}: must be between 1 and {}", limits.max_images),
        ));
    }
    let eta: f64 = num(query, "eta", 0.0, "a number >= 0")?;
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(ApiError::bad(
            "eta",
            format!("eta={eta}: must be a finite number >= 0 (0: deterministic DDIM)"),
        ));
    }
    let seed: u64 = num(query, "seed", 0, "a whole number from 0 to 2^64 - 1")?;
    let sampler = query
        .get("sampler")
        .cloned()
        .unwrap_or_else(|| "ddim".into());
    let (kind, config) = SamplerChoice::parse(Some(&sampler), false, &[])
        .and_then(|c| c.resolve(&model.scheduler_config))
        .map_err(|e| ApiError::bad("sampler", format!("{e:#}")))?;
    let options = SampleOptions {
        sampler: kind,
        num_inference_steps: steps,
        eta,
        ..SampleOptions::default()
    };
    let calls = match pipeline::scheduler_for(&config, &options) {
        Ok(s) => s.model_timesteps().len(),
        Err(e) => return Err(ApiError::bad("steps", format!("steps={steps}: {e}"))),
    };
    let init = match query.get("init") {
        None => {
            if query.contains_key("strength") {
                return Err(ApiError::bad("strength", "strength needs an init image"));
            }
            None
        }
        Some(url) => {
            let strength: f64 = num(query, "strength", 0.8, "a number in (0, 1]")?;
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(ApiError::bad(
                    "strength",
                    format!("strength={strength}: must be in (0, 1]"),
                ));
            }
            if !matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm) {
                return Err(ApiError::bad(
                    "sampler",
                    format!("sampler={sampler}: an init image runs with ddim or ddpm"),
                ));
            }
            if ((steps as f64 * strength) as usize).min(calls) == 0 {
                return Err(ApiError::bad(
                    "strength",
                    format!("steps={steps} × strength={strength} leaves no step to run"),
                ));
            }
            Some((decode_image("init", url, model)?, strength))
        }
    };
    Ok(SampleRequest {
        init,
        noise,
        sampler,
        kind,
        config,
        steps,
        eta,
        seed,
        n,
    })
}

/// Whole images' worth of f32 values (little-endian) from base64.
fn decode_f32s(b64: &str, per_image: usize) -> Result<Vec<f32>, ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::bad("noise", format!("noise: not base64 ({e})")))?;
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if !bytes.len().is_multiple_of(4)
        || values.is_empty()
        || !values.len().is_multiple_of(per_image)
    {
        return Err(ApiError::bad(
            "noise",
            format!(
                "noise: {} bytes; expected little-endian f32 x_T, {per_image} values per image",
                bytes.len()
            ),
        ));
    }
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(ApiError::bad(
            "noise",
            format!("noise: holds {bad}; x_T must be finite"),
        ));
    }
    Ok(values)
}

fn encode_f32s(t: &Tensor) -> ddim::Result<String> {
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `POST /api/invert`: `{"image": data URL, "steps": 50}` → the image's DDIM inversion.
async fn invert(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let object = json_object(body)?;
    if let Some(key) = object
        .keys()
        .find(|k| !["image", "steps"].contains(&k.as_str()))
    {
        return Err(ApiError::bad(
            key,
            format!("unknown key `{key}`; /api/invert takes image and steps"),
        ));
    }
    let steps = match object.get("steps") {
        None => 50,
        Some(v) => v
            .as_u64()
            .filter(|&s| s >= 1 && s as usize <= shared.limits.max_steps)
            .ok_or_else(|| {
                ApiError::bad(
                    "steps",
                    format!(
                        "steps={v}: must be between 1 and {}",
                        shared.limits.max_steps
                    ),
                )
            })? as usize,
    };
    let image = object
        .get("image")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad("image", "image: give the image as a data URL"))?;
    let x0 = decode_image("image", image, &shared.model)?;
    let result = blocking_job(&shared, "inversion", move |model| {
        let x_t = pipeline::invert(
            &model.unet,
            &model.scheduler_config,
            &x0,
            steps,
            None,
            &mut |_| Ok(()),
        )?;
        // a preview of x_T: unit variance shown as [-1, 1] / 3
        Ok(json!({
            "steps": steps,
            "x_t": encode_f32s(&x_t)?,
            "x_t_image": data_urls(&x_t.affine(1.0 / 3.0, 0.0)?)?[0],
        }))
    })
    .await?;
    Ok(Json(result))
}

/// The most frames of one interpolation.
const MAX_FRAMES: usize = 64;

/// `POST /api/interpolate`: two images' inversions, the slerp between them decoded.
async fn interpolate(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let object = json_object(body)?;
    const KEYS: [&str; 4] = ["a", "b", "steps", "frames"];
    if let Some(key) = object.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::bad(
            key,
            format!(
                "unknown key `{key}`; /api/interpolate takes {}",
                KEYS.join(", ")
            ),
        ));
    }
    let whole = |key: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match object.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .filter(|&n| n >= 1 && n <= max)
                .ok_or_else(|| {
                    ApiError::bad(
                        key,
                        format!("{key}={v}: must be a whole number from 1 to {max}"),
                    )
                }),
        }
    };
    let steps = whole("steps", 50, shared.limits.max_steps)?;
    let frames = whole("frames", 8, MAX_FRAMES)?;
    if frames < 2 {
        return Err(ApiError::bad("frames", "frames=1: at least the two ends"));
    }
    let mut ends = Vec::new();
    for key in ["a", "b"] {
        let url = object
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(key, format!("{key}: give an image as a data URL")))?;
        ends.push(decode_image(key, url, &shared.model)?);
    }
    let result = blocking_job(&shared, "interpolation", move |model| {
        let inverted = ends
            .iter()
            .map(|x0| {
                pipeline::invert(
                    &model.unet,
                    &model.scheduler_config,
                    x0,
                    steps,
                    None,
                    &mut |_| Ok(()),
                )
            })
            .collect::<ddim::Result<Vec<_>>>()?;
        let z = pipeline::interpolation_noise(&inverted[0], &inverted[1], frames)?;
        let options = SampleOptions {
            num_inference_steps: steps,
            ..SampleOptions::default()
        };
        let mut scheduler = pipeline::scheduler_for(&model.scheduler_config, &options)?;
        // DDIM at η = 0 draws no noise: no generator.
        let x = pipeline::denoise(&model.unet, scheduler.as_mut(), z, None, None, &mut |_| {
            Ok(())
        })?;
        Ok(json!({"steps": steps, "frames": data_urls(&x)?}))
    })
    .await?;
    Ok(Json(result))
}

/// The longest RePaint walk one request may ask for (UNet calls).
const MAX_WALK: usize = 5000;

/// `POST /api/inpaint`: RePaint of the image where the mask is black.
async fn inpaint(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let object = json_object(body)?;
    const KEYS: [&str; 8] = [
        "image",
        "mask",
        "steps",
        "jump_length",
        "jump_n_sample",
        "eta",
        "seed",
        "n",
    ];
    if let Some(key) = object.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::bad(
            key,
            format!(
                "unknown key `{key}`; /api/inpaint takes {}",
                KEYS.join(", ")
            ),
        ));
    }
    let whole = |key: &str, default: u64, max: u64| -> Result<u64, ApiError> {
        match object.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().filter(|&n| n >= 1 && n <= max).ok_or_else(|| {
                ApiError::bad(
                    key,
                    format!("{key}={v}: must be a whole number from 1 to {max}"),
                )
            }),
        }
    };
    let l = shared.limits;
    let options = RepaintOptions {
        num_inference_steps: whole("steps", 50, l.max_steps as u64)? as usize,
        jump_length: whole("jump_length", 10, 1000)? as usize,
        jump_n_sample: whole("jump_n_sample", 10, 1000)? as usize,
        eta: match object.get("eta") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|e| e.is_finite() && *e >= 0.0)
                .ok_or_else(|| ApiError::bad("eta", format!("eta={v}: a number >= 0")))?,
        },
    };
    let seed = match object.get("seed") {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ApiError::bad("seed", format!("seed={v}: a whole number >= 0")))?,
    };
    let n = whole("n", 1, l.max_images as u64)? as usize;
    let model = &shared.model;
    let walk = pipeline::repaint_timesteps(&options, model.scheduler_config.num_train_timesteps)
        .map_err(|e| ApiError::bad("steps", e.to_string()))?;
    if walk.len() > MAX_WALK {
        return Err(ApiError::bad(
            "jump_n_sample",
            format!(
                "the walk would take {} UNet calls; at most {MAX_WALK} (fewer steps or samples)",
                walk.len()
            ),
        ));
    }
    let mut inputs = Vec::new();
    for key in ["image", "mask"] {
        let url = object
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(key, format!("{key}: give an image as a data URL")))?;
        inputs.push(decode_image(key, url, model)?);
    }
    let internal_err = |e: candle_core::Error| internal(e.to_string());
    let shape = pipeline::noise_shape(&model.unet, n).map_err(|e| internal(e.to_string()))?;
    let image = inputs[0]
        .broadcast_as(shape.to_vec())
        .and_then(|t| t.contiguous())
        .map_err(internal_err)?;
    // the mask's mean over channels, kept from 50% grey up
    let mask = inputs[1]
        .mean_keepdim(1)
        .and_then(|m| m.ge(0.0))
        .and_then(|m| m.to_dtype(candle_core::DType::F32))
        .map_err(internal_err)?;
    let result = blocking_job(&shared, "inpainting", move |model| {
        let x = pipeline::repaint(
            &model.unet,
            &model.scheduler_config,
            &options,
            &image,
            &mask,
            &mut Generator::per_image(seed, 0, n),
            &mut |_, _| Ok(()),
        )?;
        Ok(json!({"images": data_urls(&x)?, "walk": walk.len()}))
    })
    .await?;
    Ok(Json(result))
}

/// Runs `work` on a blocking thread in its turn: a place in the queue (or 429), then the
/// sampling lock; its errors become HTTP 500 naming `what`.
async fn blocking_job<T: Send + 'static>(
    shared: &Arc<Shared>,
    what: &'static str,
    work: impl FnOnce(&Model) -> ddim::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = shared
        .queue
        .clone()
        .try_acquire_owned()
        .map_err(|_| busy(shared))?;
    let job = shared.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _turn = job
            .sampling
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&job.model)
    })
    .await
    .map_err(|e| internal(format!("the {what} stopped: {e}")))?
    .map_err(|e| internal(format!("the {what} failed: {e}")))
}

fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        field: None,
        message,
    }
}

fn busy(shared: &Shared) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        field: None,
        message: format!(
            "{} runs are waiting or running (--max-queue); try again when one ends",
            shared.limits.max_queue
        ),
    }
}

/// A JSON request body that must be an object.
fn json_object(
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError {
        status: e.status(),
        field: Some("body".into()),
        message: format!("the body must be a JSON object: {}", e.body_text()),
    })?;
    match body {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::bad("body", "the body must be a JSON object")),
    }
}

/// An init image from a `data:image/...;base64,` URL, at the model's size and channels.
fn decode_image(field: &str, url: &str, model: &Model) -> Result<Tensor, ApiError> {
    let bad = |why: String| ApiError::bad(field, why);
    let b64 = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .filter(|(mime, _)| mime.starts_with("image/"))
        .map(|(_, b64)| b64)
        .ok_or_else(|| {
            bad(format!(
                "{field}: expected an image as a data URL (data:image/png;base64,...)"
            ))
        })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| bad(format!("{field}: not base64 ({e})")))?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("{field}: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(4096);
    limits.max_image_height = Some(4096);
    limits.max_alloc = Some(64 << 20);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        bad(format!(
            "{field}: cannot decode the image ({e}); PNG, JPEG and GIF up to 4096×4096 are supported"
        ))
    })?;
    let shape = pipeline::noise_shape(&model.unet, 1).map_err(|e| bad(e.to_string()))?;
    ddim::image_io::from_image(&img, shape[1], Some((shape[3] as u32, shape[2] as u32)))
        .and_then(|t| Ok(t.to_device(&model.device)?))
        .map_err(|e| bad(format!("{field}: {e}")))
}

/// `POST /api/sample`: the keys of the GET query as a JSON object.
async fn sample_post(
    state: State<Arc<Shared>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(body)?;
    let query = object
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect();
    Ok(sample(state, Query(query)).await?.into_response())
}

async fn sample(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let request = parse_request(&query, &shared.model, shared.limits)?;
    let permit = shared
        .queue
        .clone()
        .try_acquire_owned()
        .map_err(|_| busy(&shared))?;
    let (tx, rx) = mpsc::channel::<Event>(4);
    shared.started.fetch_add(1, Ordering::SeqCst);
    let job = shared.clone();
    tokio::task::spawn_blocking(move || run_job(&job, &request, &tx, permit));
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, std::convert::Infallible>,
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The end of a run that was not a success.
enum Stop {
    /// The client went away.
    Cancelled,
    Failed(String),
}

/// Samples one run on a blocking thread, sending its events; holds its queue permit to the end.
fn run_job(
    shared: &Shared,
    request: &SampleRequest,
    tx: &mpsc::Sender<Event>,
    _permit: OwnedSemaphorePermit,
) {
    let outcome = {
        // (a run that panicked leaves the lock poisoned, not the server stopped)
        let _turn = shared
            .sampling
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tx.is_closed() {
            Err(Stop::Cancelled)
        } else {
            sample_run(&shared.model, request, tx)
        }
    };
    let counter = match outcome {
        Ok(()) => &shared.finished,
        Err(Stop::Cancelled) => &shared.cancelled,
        Err(Stop::Failed(message)) => {
            let _ = tx.blocking_send(event("error", &json!({ "error": message })));
            &shared.failed
        }
    };
    counter.fetch_add(1, Ordering::SeqCst);
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The images of a batch as PNG data URLs.
fn data_urls(x: &Tensor) -> ddim::Result<Vec<String>> {
    ddim::image_io::to_images(x)?
        .iter()
        .map(|img| {
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| ddim::Error::argument("image", "a preview", e.to_string()))?;
            Ok(format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(png)
            ))
        })
        .collect()
}

fn sample_run(model: &Model, r: &SampleRequest, tx: &mpsc::Sender<Event>) -> Result<(), Stop> {
    let started = Instant::now();
    let failed = |e: &dyn std::fmt::Display| Stop::Failed(e.to_string());
    let shape = pipeline::noise_shape(&model.unet, r.n).map_err(|e| failed(&e))?;
    // the same images as `ddim sample --seed S -n N` with the default rng
    let mut generator = Generator::per_image(r.seed, 0, r.n);
    let options = SampleOptions {
        sampler: r.kind,
        num_inference_steps: r.steps,
        eta: r.eta,
        ..SampleOptions::default()
    };
    let mut cancelled = false;
    let mut on_step = |step: &StepInfo| {
        let data = json!({
            "index": step.index,
            "num_steps": step.num_steps,
            "t": step.timestep,
            "xt": data_urls(step.prev_sample)?,
            "x0": data_urls(step.pred_original_sample)?,
        });
        if tx.blocking_send(event("step", &data)).is_err() {
            cancelled = true;
            return Err(ddim::Error::argument(
                "run",
                "cancelled",
                "a client still listening",
            ));
        }
        Ok(())
    };
    let result = match &r.init {
        Some((init, strength)) => init
            .broadcast_as(shape.to_vec())
            .and_then(|t| t.contiguous())
            .map_err(ddim::Error::from)
            .and_then(|init| {
                pipeline::sdedit(
                    &model.unet,
                    &r.config,
                    &options,
                    &init,
                    *strength,
                    &mut generator,
                    &mut on_step,
                )
            }),
        None => match &r.noise {
            Some(v) => Tensor::from_vec(v.clone(), shape.to_vec(), &model.device)
                .map_err(ddim::Error::from),
            None => generator.randn(&shape, &model.device),
        }
        .and_then(|x_t| {
            pipeline::sample(
                &model.unet,
                &r.config,
                &options,
                x_t,
                &mut generator,
                &mut on_step,
            )
        }),
    };
    if cancelled {
        return Err(Stop::Cancelled);
    }
    let x0 = result.map_err(|e| failed(&e))?;
    let done = json!({
        "images": data_urls(&x0).map_err(|e| failed(&e))?,
        "sampler": r.sampler,
        "steps": r.steps,
        "eta": r.eta,
        "seed": r.seed,
        "seconds": started.elapsed().as_secs_f64(),
    });
    tx.blocking_send(event("done", &done))
        .map_err(|_| Stop::Cancelled)
}
