//! `ddim eval --experiment consistency|reconstruction`: the DDIM paper's §5.2 and §5.4 on one
//! model, each as a table (printed), a CSV, a plot and image grids.
//!
//! - consistency (§5.2, Fig. 5): the same x_T sampled at every `--steps` count, per sampler (and
//!   per η for DDIM); each run's distance to the run of the most steps, as the per-dimension mean
//!   squared error on the [0, 1] image scale. With η = 0 DDIM is an ODE solver and the images
//!   agree in their high-level features across step counts; a DDPM-like sampler draws new noise
//!   at every step and they do not.
//! - reconstruction (§5.4, Table 2): real images encoded by DDIM inversion at S steps and decoded
//!   by DDIM (η = 0) at S steps; the per-dimension mean squared error on the [0, 1] scale, which
//!   the paper shows falling with S.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use ddim::image_io;
use ddim::pipeline::{self, Generator, SampleOptions};
use ddim::scheduler::{SchedulerConfig, SchedulerKind};
use ddim::train::Dataset;

use crate::common::{self, SamplerChoice};
use crate::eval_cmd::{EvalArgs, Experiment};
use crate::plot::{self, LineChart, Series};
use crate::run_record::{write_record, RECORD_NAME};
use crate::UsageError;

/// One row of the consistency experiment: a sampler (and η, for DDIM) with its config.
struct Row {
    label: String,
    kind: SchedulerKind,
    config: SchedulerConfig,
    eta: f64,
}

/// Runs `--experiment consistency` or `reconstruction` (the table is `eval_cmd`'s own).
pub fn run(args: &EvalArgs, experiment: Experiment) -> Result<()> {
    let started = Instant::now();
    let steps = check_steps(args)?;
    let model = common::load_model(&args.model, None, args.compute.dtype.dtype())?;
    model.check_scheduler_class()?;
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    let real = match experiment {
        Experiment::Reconstruction => Some(crate::eval_cmd::open_real(
            args.data()?,
            shape[1],
            shape[2],
        )?),
        _ => None,
    };
    let rows = match experiment {
        Experiment::Consistency => rows(args, &model)?,
        _ => Vec::new(),
    };
    let out = args.out();
    let files = output_files(experiment);
    image_io::ensure_writable_dir(&out)?;
    for f in files.iter().chain([&RECORD_NAME]) {
        common::refuse_existing(&out.join(f), args.overwrite)?;
    }
    let mut record = model.run_record("eval", SchedulerKind::Ddim, &args.compute)?;
    record
        .set("experiment", experiment.name())
        .set("steps", steps.clone())
        .set("num_samples", args.n())
        .set("seed", args.seed);
    match (experiment, real) {
        (Experiment::Consistency, _) => {
            record
                .set("samplers", args.sampler.clone())
                .set("eta", args.eta.clone());
            write_record(&out.join(RECORD_NAME), &record)?;
            consistency(args, &model, &rows, &steps, &out)?;
        }
        (Experiment::Reconstruction, Some(real)) => {
            record.set("data", args.data()?);
            write_record(&out.join(RECORD_NAME), &record)?;
            reconstruction(args, &model, &real, &steps, &out)?;
        }
        _ => unreachable!("the table is eval_cmd's; reconstruction has its data"),
    }
    eprintln!("in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn output_files(experiment: Experiment) -> [&'static str; 3] {
    match experiment {
        Experiment::Reconstruction => [
            "reconstruction.csv",
            "reconstruction.png",
            "reconstruction_grid.png",
        ],
        _ => ["consistency.csv", "consistency.png", "consistency_grid.png"],
    }
}

/// The step counts, ascending without repeats, each at least 1.
fn check_steps(args: &EvalArgs) -> Result<Vec<usize>> {
    let mut steps = args.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    if steps.is_empty() || steps[0] == 0 {
        return Err(UsageError(format!(
            "--steps {:?}: give step counts of at least 1 (e.g. --steps 10,20,50,100,1000)",
            args.steps
        ))
        .into());
    }
    if args.n() == 0 {
        return Err(UsageError("-n 0: the experiment needs at least one image".into()).into());
    }
    if args.batch_size == 0 {
        return Err(UsageError("--batch-size 0: must be at least 1".into()).into());
    }
    Ok(steps)
}

/// The consistency rows: every `--sampler`, DDIM once per `--eta`.
fn rows(args: &EvalArgs, model: &common::Model) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for name in &args.sampler {
        let choice = SamplerChoice::parse(Some(name), false, &[])?;
        let (kind, config) = choice.resolve(&model.scheduler_config)?;
        if kind == SchedulerKind::Ddim {
            for &eta in &args.eta {
                if !(eta.is_finite() && eta >= 0.0) {
                    return Err(UsageError(format!(
                        "--eta {eta}: each eta must be a finite number >= 0"
                    ))
                    .into());
                }
                rows.push(Row {
                    label: format!("{name} eta={eta}"),
                    kind,
                    config: config.clone(),
                    eta,
                });
            }
        } else {
            rows.push(Row {
                label: name.clone(),
                kind,
                config,
                eta: 0.0,
            });
        }
    }
    Ok(rows)
}

/// Samples images `0..n` of the run seeded `seed` (the same x_T for image i in every call) with
/// `row`'s sampler at `steps` steps, on the CPU.
fn sample_all(
    args: &EvalArgs,
    model: &common::Model,
    row: &Row,
    steps: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Tensor> {
    let (n, batch) = (args.n(), args.batch_size.min(args.n()));
    let options = SampleOptions {
        sampler: row.kind,
        num_inference_steps: steps,
        eta: row.eta,
        ..SampleOptions::default()
    };
    let mut parts = Vec::new();
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let mut generator = Generator::per_image(args.seed, start as u64, len);
        let shape = pipeline::noise_shape(&model.unet, len)?;
        let x_t = generator.randn(&shape, &model.device)?;
        let x0 = pipeline::sample(
            &model.unet,
            &row.config,
            &options,
            x_t,
            &mut generator,
            &mut |_| {
                bar.inc(len as u64);
                Ok(())
            },
        )
        .with_context(|| format!("{}, {steps} steps", row.label))?;
        parts.push(x0.to_device(&Device::Cpu)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The per-dimension mean squared error of `a` against `b` on the [0, 1] image scale (clipped
/// as images are saved).
pub fn image_mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let to01 = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?
            .affine(0.5, 0.5)?
            .clamp(0f32, 1f32)?)
    };
    Ok((to01(a)? - to01(b)?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64)
}

/// §5.2: each row's runs at every step count, against its run of the most steps.
fn consistency(
    args: &EvalArgs,
    model: &common::Model,
    rows: &[Row],
    steps: &[usize],
    out: &Path,
) -> Result<()> {
    let n = args.n();
    let reference = *steps.last().expect("checked non-empty");
    let per_row: u64 = steps.iter().map(|&s| (n * s) as u64).sum();
    let bar = common::progress(
        per_row * rows.len() as u64,
        args.model.quiet,
        "consistency",
        "image-steps",
    );
    // (row, steps, mse against the reference)
    let mut results: Vec<(usize, usize, f64)> = Vec::new();
    let mut grid_images = Vec::new();
    let shown = n.min(8);
    for (r, row) in rows.iter().enumerate() {
        let runs = steps
            .iter()
            .map(|&s| {
                bar.set_message(format!("{}, {s} steps", row.label));
                sample_all(args, model, row, s, &bar)
            })
            .collect::<Result<Vec<_>>>()?;
        let last = runs.last().expect("one run per step count");
        for (&s, x) in steps.iter().zip(&runs) {
            results.push((r, s, image_mse(x, last)?));
            grid_images.extend(grid_row(x, shown)?);
        }
        let done: Vec<String> = results
            .iter()
            .filter(|(i, _, _)| *i == r)
            .map(|(_, s, e)| format!("{s}: {e:.5}"))
            .collect();
        bar.suspend(|| eprintln!("{}: {}", row.label, done.join(", ")));
    }
    bar.finish_and_clear();
    let mut csv = String::from("sampler,eta,steps,reference_steps,num_samples,mse_to_reference\n");
    for &(r, s, e) in &results {
        let _ = writeln!(
            csv,
            "{},{},{s},{reference},{n},{e:.8}",
            rows[r].label.split(' ').next().unwrap_or_default(),
            rows[r].eta
        );
    }
    write_text(&out.join("consistency.csv"), &csv)?;
    let chart = LineChart {
        title: format!("distance to the {reference}-step sample from the same x_T"),
        x_label: "steps".into(),
        y_label: "per-dimension MSE, [0, 1] scale".into(),
        log_x: true,
        log_y: false,
        series: rows
            .iter()
            .enumerate()
            .map(|(r, row)| Series {
                name: row.label.clone(),
                points: results
                    .iter()
                    .filter(|(i, s, _)| *i == r && *s != reference)
                    .map(|&(_, s, e)| (s as f64, e))
                    .collect(),
            })
            .collect(),
    };
    let png = out.join("consistency.png");
    plot::save_line_chart(&png, &chart, (720, 480))
        .with_context(|| format!("writing {}", png.display()))?;
    let grid = out.join("consistency_grid.png");
    image_io::save_png(&image_io::make_grid(&grid_images, Some(shown), 2)?, &grid)?;
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    say!(
        "consistency of {} ({n} images from the same x_T per run, seed {}): per-dimension MSE \
         ([0, 1] scale) to the {reference}-step image\n{}",
        model.source,
        args.seed,
        table("sampler \\ steps", &labels, steps, &results)
    );
    eprintln!(
        "wrote {}, {} and {} (rows: {}; in each, one line per step count)",
        out.join("consistency.csv").display(),
        png.display(),
        grid.display(),
        labels.join(", ")
    );
    Ok(())
}

/// §5.4: real images inverted and decoded at every step count.
fn reconstruction(
    args: &EvalArgs,
    model: &common::Model,
    real: &Dataset,
    steps: &[usize],
    out: &Path,
) -> Result<()> {
    let n = args.n().min(real.len);
    let x0 = evenly_spaced(real, n)?.to_device(&model.device)?;
    let batch = args.batch_size.min(n);
    let total: u64 = steps.iter().map(|&s| (2 * n * s) as u64).sum();
    let bar = common::progress(total, args.model.quiet, "reconstruction", "image-steps");
    let shown = n.min(8);
    let mut grid_images = grid_row(&x0, shown)?;
    let mut results = Vec::new();
    for &s in steps {
        bar.set_message(format!("{s} steps"));
        let options = SampleOptions {
            num_inference_steps: s,
            ..SampleOptions::default()
        };
        let mut parts = Vec::new();
        for start in (0..n).step_by(batch) {
            let len = batch.min(n - start);
            let mut tick = |_: &pipeline::StepInfo| {
                bar.inc(len as u64);
                Ok(())
            };
            let x_t = pipeline::invert(
                &model.unet,
                &model.scheduler_config,
                &x0.narrow(0, start, len)?,
                s,
                None,
                &mut tick,
            )?;
            let mut scheduler = pipeline::scheduler_for(&model.scheduler_config, &options)?;
            // DDIM at η = 0 draws no noise: no generator.
            let x = pipeline::denoise(&model.unet, scheduler.as_mut(), x_t, None, None, &mut tick)
                .with_context(|| format!("decoding at {s} steps"))?;
            parts.push(x);
        }
        let x = Tensor::cat(&parts, 0)?;
        let mse = image_mse(&x, &x0)?;
        bar.suspend(|| eprintln!("{s} steps: per-dimension MSE {mse:.6}"));
        grid_images.extend(grid_row(&x, shown)?);
        results.push((0, s, mse));
    }
    bar.finish_and_clear();
    let mut csv = String::from("steps,num_images,mse\n");
    for &(_, s, e) in &results {
        let _ = writeln!(csv, "{s},{n},{e:.8}");
    }
    write_text(&out.join("reconstruction.csv"), &csv)?;
    let chart = LineChart {
        title: "reconstruction error of DDIM inversion + DDIM decoding".into(),
        x_label: "steps S (each way)".into(),
        y_label: "per-dimension MSE, [0, 1] scale".into(),
        log_x: true,
        log_y: true,
        series: vec![Series {
            name: real.source.clone(),
            points: results.iter().map(|&(_, s, e)| (s as f64, e)).collect(),
        }],
    };
    let png = out.join("reconstruction.png");
    plot::save_line_chart(&png, &chart, (720, 480))
        .with_context(|| format!("writing {}", png.display()))?;
    let grid = out.join("reconstruction_grid.png");
    image_io::save_png(&image_io::make_grid(&grid_images, Some(shown), 2)?, &grid)?;
    say!(
        "reconstruction by {} of {n} images of {} (DDIM inversion, then DDIM at eta 0, S steps \
         each way): per-dimension MSE ([0, 1] scale)\n{}",
        model.source,
        real.source,
        table("", &["mse".to_string()], steps, &results)
    );
    eprintln!(
        "wrote {}, {} and {} (first line: the real images; then one line per S)",
        out.join("reconstruction.csv").display(),
        png.display(),
        grid.display()
    );
    Ok(())
}

/// `n` images of the set at evenly spaced indices (every class of a set stored class by class),
/// as an NCHW tensor in [-1, 1].
fn evenly_spaced(real: &Dataset, n: usize) -> Result<Tensor> {
    let mut data = Vec::with_capacity(n * real.channels * real.size * real.size);
    for k in 0..n {
        data.extend_from_slice(real.image(k * real.len / n));
    }
    Ok(Tensor::from_vec(
        data,
        (n, real.channels, real.size, real.size),
        &Device::Cpu,
    )?)
}

/// The first `k` images of `x`, enlarged 2× below 32 pixels, for a grid line.
fn grid_row(x: &Tensor, k: usize) -> Result<Vec<image::DynamicImage>> {
    let scale = if x.dim(2)? < 32 { 2 } else { 1 };
    Ok(image_io::to_images(&x.narrow(0, 0, k)?)?
        .iter()
        .map(|img| image_io::upscale_nearest(img, scale))
        .collect::<ddim::Result<Vec<_>>>()?)
}

fn table(
    corner: &str,
    labels: &[String],
    steps: &[usize],
    results: &[(usize, usize, f64)],
) -> String {
    let first = labels
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(corner.len())
        + 2;
    let mut out = format!("{corner:<first$}");
    for s in steps {
        let _ = write!(out, "{s:>10}");
    }
    for (r, label) in labels.iter().enumerate() {
        let _ = write!(out, "\n{label:<first$}");
        for &s in steps {
            match results.iter().find(|(i, t, _)| *i == r && *t == s) {
                Some((_, _, e)) => {
                    let _ = write!(out, "{e:>10.5}");
                }
                None => {
                    let _ = write!(out, "{:>10}", "");
                }
            }
        }
    }
    out
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    ddim::atomic::write_atomically(path, |w| w.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}
