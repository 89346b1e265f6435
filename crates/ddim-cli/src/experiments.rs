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
//! - nfe: for every sampler, the largest step count whose run calls the UNet at most K times,
//!   for every K in `--steps`; the quality metrics of `ddim eval` at each, and the distance of
//!   the first 64 images to DDIM's (η = 0) at `--reference-steps` from the same x_T: how far the
//!   sampler is from the probability-flow ODE's solution, with the order p fitted to
//!   distance ∝ NFE^-p.
//! - interpolation (§5.3 on real images): `-n` images of `--data` paired (image 0 with n-1, 1
//!   with n-2, ...), each pair inverted by DDIM at the first `--steps` count, the great circle
//!   between the two x_T decoded at η = 0 in 8 frames; a strip per pair and each frame's
//!   distance to the two ends' reconstructions.

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
pub struct Row {
    pub label: String,
    pub kind: SchedulerKind,
    pub config: SchedulerConfig,
    pub eta: f64,
}

/// Runs `--experiment consistency` or `reconstruction` (the table is `eval_cmd`'s own).
pub fn run(args: &EvalArgs, experiment: Experiment) -> Result<()> {
    let started = Instant::now();
    let steps = check_steps(args)?;
    let model = common::load_model(&args.model, None, args.compute.dtype.dtype())?;
    model.check_scheduler_class()?;
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    let real = match experiment {
        Experiment::Reconstruction | Experiment::Nfe | Experiment::Interpolation => Some(
            crate::eval_cmd::open_real(args.data()?, shape[1], shape[2])?,
        ),
        _ => None,
    };
    let rows = match experiment {
        Experiment::Consistency | Experiment::Nfe => rows(args, &model)?,
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
                .set("samplers", args.samplers())
                .set("eta", args.eta.clone());
            write_record(&out.join(RECORD_NAME), &record)?;
            consistency(args, &model, &rows, &steps, &out)?;
        }
        (Experiment::Nfe, Some(real)) => {
            record
                .set("samplers", args.samplers())
                .set("data", args.data()?)
                .set("k", args.k)
                .set("reference_steps", args.reference_steps);
            write_record(&out.join(RECORD_NAME), &record)?;
            let evaluator = crate::eval_cmd::real_statistics(&real, args.k)?;
            nfe(args, &model, &rows, &steps, &evaluator, &out)?;
        }
        (Experiment::Interpolation, Some(real)) => {
            record.set("data", args.data()?);
            write_record(&out.join(RECORD_NAME), &record)?;
            interpolation(args, &model, &real, steps[0], &out)?;
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
        Experiment::Nfe => ["nfe.csv", "nfe.png", "nfe_grid.png"],
        Experiment::Interpolation => [
            "interpolation.csv",
            "interpolation.png",
            "interpolation_grid.png",
        ],
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
    let mut steps = args.step_list();
    steps.sort_unstable();
    steps.dedup();
    if steps.is_empty() || steps[0] == 0 {
        return Err(UsageError(format!(
            "--steps {:?}: give step counts of at least 1 (e.g. --steps 10,20,50,100,1000)",
            args.step_list()
        ))
        .into());
    }
    if args.n() == 0 {
        return Err(UsageError("-n 0: the experiment needs at least one image".into()).into());
    }
    if args.experiment == Experiment::Interpolation && args.n() < 2 {
        return Err(UsageError(format!(
            "-n {}: the interpolation experiment pairs images; give at least 2",
            args.n()
        ))
        .into());
    }
    if args.experiment == Experiment::Nfe && args.reference_steps == 0 {
        return Err(UsageError("--reference-steps 0: must be at least 1".into()).into());
    }
    if args.batch_size == 0 {
        return Err(UsageError("--batch-size 0: must be at least 1".into()).into());
    }
    Ok(steps)
}

/// The consistency rows: every `--sampler`, DDIM once per `--eta`.
fn rows(args: &EvalArgs, model: &common::Model) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for name in &args.samplers() {
        let choice = SamplerChoice::parse(Some(name), false, &[])?;
        let (kind, config) = choice.resolve(&model.scheduler_config)?;
        if kind == SchedulerKind::Ddim && args.experiment == Experiment::Consistency {
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
    sample_first(args, model, row, steps, args.n(), bar)
}

/// [`sample_all`] of images `0..n` only.
pub fn sample_first(
    args: &EvalArgs,
    model: &common::Model,
    row: &Row,
    steps: usize,
    n: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Tensor> {
    let batch = args.batch_size.min(n);
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

/// Images of the nfe experiment's distance to the ODE's solution.
const NFE_REFERENCE_IMAGES: usize = 64;

/// The largest step count whose run of `row`'s sampler calls the UNet at most `nfe` times, and
/// its number of calls; `None` when even one step takes more.
fn steps_for_nfe(row: &Row, nfe: usize) -> Result<Option<(usize, usize)>> {
    for steps in (1..=nfe).rev() {
        let built = ddim::scheduler::build(
            &row.config,
            row.kind,
            steps,
            ddim::scheduler::DdimStepOptions::default(),
        );
        // (a step count a sampler cannot take, e.g. PNDM's PRK below its minimum, is skipped)
        if let Ok(s) = built {
            let calls = s.model_timesteps().len();
            if calls <= nfe {
                return Ok(Some((steps, calls)));
            }
        }
    }
    Ok(None)
}

/// One cell of the nfe experiment.
struct NfeCell {
    row: usize,
    steps: usize,
    nfe: usize,
    scores: ddim::eval::Scores,
    mse: f64,
}

/// The order p of a least-squares fit `log mse = c - p log nfe` over a row's cells (those with a
/// positive distance), if it has two or more.
fn fitted_order(cells: &[&NfeCell]) -> Option<f64> {
    let pts: Vec<(f64, f64)> = cells
        .iter()
        .filter(|c| c.mse > 0.0)
        .map(|c| ((c.nfe as f64).ln(), c.mse.ln()))
        .collect();
    if pts.len() < 2 {
        return None;
    }
    let k = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / k,
        pts.iter().map(|p| p.1).sum::<f64>() / k,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| -sxy / sxx)
}

/// The NFE ladder: every sampler at every budget of UNet calls.
fn nfe(
    args: &EvalArgs,
    model: &common::Model,
    rows: &[Row],
    budgets: &[usize],
    evaluator: &ddim::eval::Evaluator,
    out: &Path,
) -> Result<()> {
    let n = args.n();
    let m = n.min(NFE_REFERENCE_IMAGES);
    // every (row, steps, nfe), without repeats where two budgets give one step count
    let mut plan: Vec<(usize, usize, usize)> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        for &budget in budgets {
            match steps_for_nfe(row, budget)? {
                Some((s, calls)) if !plan.contains(&(r, s, calls)) => plan.push((r, s, calls)),
                Some(_) => {}
                None => eprintln!("note: {} cannot run within {budget} UNet calls", row.label),
            }
        }
    }
    let total = (m * args.reference_steps) as u64
        + plan.iter().map(|&(_, _, c)| (n * c) as u64).sum::<u64>();
    let bar = common::progress(total, args.model.quiet, "nfe", "image-steps");
    bar.set_message(format!("reference: DDIM, {} steps", args.reference_steps));
    let ddim_row = Row {
        label: "ddim".into(),
        kind: SchedulerKind::Ddim,
        config: model.scheduler_config.clone(),
        eta: 0.0,
    };
    let reference = sample_first(args, model, &ddim_row, args.reference_steps, m, &bar)?;
    let mut cells = Vec::new();
    let mut grid_images = Vec::new();
    let shown = n.min(8);
    for &(r, s, calls) in &plan {
        let row = &rows[r];
        bar.set_message(format!("{}, {calls} calls", row.label));
        let x = sample_all(args, model, row, s, &bar)?;
        let samples = x.flatten_all()?.to_vec1::<f32>()?;
        let scores = evaluator
            .score(&samples, n)
            .with_context(|| format!("scoring {} at {calls} calls", row.label))?;
        let mse = image_mse(&x.narrow(0, 0, m)?, &reference)?;
        bar.suspend(|| {
            eprintln!(
                "{:<10} {calls:>4} calls ({s} steps): FD(pixels) {:.3}, distance to the ODE solution {mse:.6}",
                row.label, scores.fd_pixels
            )
        });
        grid_images.extend(grid_row(&x, shown)?);
        cells.push(NfeCell {
            row: r,
            steps: s,
            nfe: calls,
            scores,
            mse,
        });
    }
    bar.finish_and_clear();
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.6}"));
    let mut csv = String::from(
        "sampler,nfe,steps,num_samples,fd_pixels,fd_classifier,precision,recall,\
         classifier_score,mse_to_reference,reference_images,reference_steps\n",
    );
    for c in &cells {
        let _ = writeln!(
            csv,
            "{},{},{},{n},{:.6},{},{},{},{},{:.8},{m},{}",
            rows[c.row].label,
            c.nfe,
            c.steps,
            c.scores.fd_pixels,
            opt(c.scores.fd_features),
            opt(c.scores.precision),
            opt(c.scores.recall),
            opt(c.scores.class_score),
            c.mse,
            args.reference_steps
        );
    }
    write_text(&out.join("nfe.csv"), &csv)?;
    let chart = |title: &str, y: &str, log_y: bool, get: fn(&NfeCell) -> f64| LineChart {
        title: title.into(),
        x_label: "UNet calls (NFE)".into(),
        y_label: y.into(),
        log_x: true,
        log_y,
        series: rows
            .iter()
            .enumerate()
            .map(|(r, row)| Series {
                name: row.label.clone(),
                points: cells
                    .iter()
                    .filter(|c| c.row == r)
                    .map(|c| (c.nfe as f64, get(c)))
                    .filter(|p| !log_y || p.1 > 0.0)
                    .collect(),
            })
            .collect(),
    };
    let png = out.join("nfe.png");
    plot::save_panels(
        &png,
        &[
            chart(
                "FD in pixel space (lower is better)",
                "fd_pixels",
                false,
                |c| c.scores.fd_pixels,
            ),
            chart(
                &format!(
                    "distance to DDIM at {} steps (the ODE's solution)",
                    args.reference_steps
                ),
                "per-dimension MSE, [0, 1] scale",
                true,
                |c| c.mse,
            ),
        ],
        2,
        (720, 480),
    )
    .with_context(|| format!("writing {}", png.display()))?;
    let grid = out.join("nfe_grid.png");
    image_io::save_png(&image_io::make_grid(&grid_images, Some(shown), 2)?, &grid)?;
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let mut nfes: Vec<usize> = cells.iter().map(|c| c.nfe).collect();
    nfes.sort_unstable();
    nfes.dedup();
    let fd: Vec<(usize, usize, f64)> = cells
        .iter()
        .map(|c| (c.row, c.nfe, c.scores.fd_pixels))
        .collect();
    let dist: Vec<(usize, usize, f64)> = cells.iter().map(|c| (c.row, c.nfe, c.mse)).collect();
    let mut orders = String::new();
    for (r, label) in labels.iter().enumerate() {
        let mine: Vec<&NfeCell> = cells.iter().filter(|c| c.row == r).collect();
        let p = fitted_order(&mine).map_or_else(|| "-".into(), |p| format!("{p:.2}"));
        let _ = write!(orders, "\n{label:<12}{p:>8}");
    }
    say!(
        "NFE ladder of {} against {} ({n} samples per cell, seed {}):\n\nFD in pixel space \
         (lower is better), columns: UNet calls\n{}\n\ndistance of the first {m} images to \
         DDIM's at {} steps from the same x_T (per-dimension MSE, [0, 1] scale)\n{}\n\nfitted \
         order p (distance ∝ NFE^-p){orders}",
        model.source,
        args.data()?,
        args.seed,
        table("sampler \\ NFE", &labels, &nfes, &fd),
        args.reference_steps,
        table("sampler \\ NFE", &labels, &nfes, &dist),
    );
    eprintln!(
        "wrote {}, {} and {} (one line per sampler and NFE)",
        out.join("nfe.csv").display(),
        png.display(),
        grid.display()
    );
    Ok(())
}

/// Frames of each interpolation strip, both ends included.
const FRAMES: usize = 8;

/// §5.3 on real images: pairs inverted, the slerp between their x_T decoded.
fn interpolation(
    args: &EvalArgs,
    model: &common::Model,
    real: &Dataset,
    steps: usize,
    out: &Path,
) -> Result<()> {
    let n = args.n().min(real.len);
    if n < 2 {
        return Err(UsageError(format!(
            "-n {n}: the interpolation experiment pairs images; give at least 2"
        ))
        .into());
    }
    let x0 = evenly_spaced(real, n)?.to_device(&model.device)?;
    let pairs = n / 2;
    let bar = common::progress(
        (pairs * (2 + FRAMES) * steps) as u64,
        args.model.quiet,
        "interpolation",
        "image-steps",
    );
    let options = SampleOptions {
        num_inference_steps: steps,
        ..SampleOptions::default()
    };
    let mut strips = Vec::new();
    let mut csv = String::from("pair,frame,alpha,mse_to_a,mse_to_b\n");
    // (alpha, mean distance to a, to b)
    let mut curves = vec![(0.0, 0.0, 0.0); FRAMES];
    for p in 0..pairs {
        let ends = Tensor::cat(&[x0.narrow(0, p, 1)?, x0.narrow(0, n - 1 - p, 1)?], 0)?;
        let x_t = pipeline::invert(
            &model.unet,
            &model.scheduler_config,
            &ends,
            steps,
            None,
            &mut |_| {
                bar.inc(2);
                Ok(())
            },
        )?;
        let z =
            pipeline::interpolation_noise(&x_t.narrow(0, 0, 1)?, &x_t.narrow(0, 1, 1)?, FRAMES)?;
        let mut scheduler = pipeline::scheduler_for(&model.scheduler_config, &options)?;
        // DDIM at η = 0 draws no noise: no generator.
        let frames =
            pipeline::denoise(&model.unet, scheduler.as_mut(), z, None, None, &mut |_| {
                bar.inc(FRAMES as u64);
                Ok(())
            })?;
        let (a, b) = (frames.narrow(0, 0, 1)?, frames.narrow(0, FRAMES - 1, 1)?);
        for (k, curve) in curves.iter_mut().enumerate() {
            let f = frames.narrow(0, k, 1)?;
            let alpha = k as f64 / (FRAMES - 1) as f64;
            let (da, db) = (image_mse(&f, &a)?, image_mse(&f, &b)?);
            let _ = writeln!(csv, "{p},{k},{alpha:.4},{da:.8},{db:.8}");
            curve.0 = alpha;
            curve.1 += da / pairs as f64;
            curve.2 += db / pairs as f64;
        }
        // the strip: the real a, the frames, the real b
        strips.extend(grid_row(&ends.narrow(0, 0, 1)?, 1)?);
        strips.extend(grid_row(&frames, FRAMES)?);
        strips.extend(grid_row(&ends.narrow(0, 1, 1)?, 1)?);
    }
    bar.finish_and_clear();
    write_text(&out.join("interpolation.csv"), &csv)?;
    let chart = LineChart {
        title: format!("frames between two inverted real images ({pairs} pairs, {steps} steps)"),
        x_label: "alpha (0: image a, 1: image b)".into(),
        y_label: "mean per-dimension MSE, [0, 1] scale".into(),
        log_x: false,
        log_y: false,
        series: vec![
            Series {
                name: "to a's reconstruction".into(),
                points: curves.iter().map(|c| (c.0, c.1)).collect(),
            },
            Series {
                name: "to b's reconstruction".into(),
                points: curves.iter().map(|c| (c.0, c.2)).collect(),
            },
        ],
    };
    let png = out.join("interpolation.png");
    plot::save_line_chart(&png, &chart, (720, 480))
        .with_context(|| format!("writing {}", png.display()))?;
    let grid = out.join("interpolation_grid.png");
    image_io::save_png(&image_io::make_grid(&strips, Some(FRAMES + 2), 2)?, &grid)?;
    let mut table = String::from("alpha     to a      to b");
    for c in &curves {
        let _ = write!(table, "\n{:<6.3}{:>9.5}{:>10.5}", c.0, c.1, c.2);
    }
    say!(
        "interpolation by {} between {pairs} pairs of {} images (DDIM inversion and decoding at \
         {steps} steps, slerp between the x_T): mean per-dimension MSE of each frame to the \
         ends' reconstructions\n{table}",
        model.source,
        real.source
    );
    eprintln!(
        "wrote {}, {} and {} (a line per pair: real a, {FRAMES} frames, real b)",
        out.join("interpolation.csv").display(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(nfe: usize, mse: f64) -> NfeCell {
        NfeCell {
            row: 0,
            steps: nfe,
            nfe,
            scores: ddim::eval::Scores {
                fd_pixels: 0.0,
                fd_features: None,
                precision: None,
                recall: None,
                class_entropy: None,
                top_class_share: None,
                class_score: None,
            },
            mse,
        }
    }

    #[test]
    fn the_fitted_order_is_the_slope_of_the_log_log_line() {
        // mse = 3 · nfe^-2 exactly: order 2
        let cells: Vec<NfeCell> = [5, 10, 20, 50]
            .iter()
            .map(|&k| cell(k, 3.0 * (k as f64).powi(-2)))
            .collect();
        let refs: Vec<&NfeCell> = cells.iter().collect();
        assert!((fitted_order(&refs).unwrap() - 2.0).abs() < 1e-12);
        // one point, or zero distances only: no fit
        assert_eq!(fitted_order(&refs[..1]), None);
        let zeros = [cell(5, 0.0), cell(10, 0.0)];
        assert_eq!(fitted_order(&zeros.iter().collect::<Vec<_>>()), None);
    }

    #[test]
    fn steps_for_a_budget_count_every_unet_call() {
        let config = SchedulerConfig::default();
        let row = |kind| Row {
            label: String::new(),
            kind,
            config: config.clone(),
            eta: 0.0,
        };
        // one call per step
        assert_eq!(
            steps_for_nfe(&row(SchedulerKind::Ddim), 7).unwrap(),
            Some((7, 7))
        );
        // Heun: 2 · steps - 1 calls
        assert_eq!(
            steps_for_nfe(&row(SchedulerKind::HeunDiscrete), 10).unwrap(),
            Some((5, 9))
        );
        assert_eq!(
            steps_for_nfe(&row(SchedulerKind::HeunDiscrete), 1).unwrap(),
            Some((1, 1))
        );
    }
}
