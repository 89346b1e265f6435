//! `ddim eval`: the DDIM paper's Table 1 on one model. For every (eta, steps) cell, N images are
//! sampled with DDIM at that η (the same N starting noises x_T in every cell) and scored against
//! the real set with `ddim::eval`; the command prints one table per metric (rows η, columns
//! steps) and writes `metrics.csv`, `metrics.png` and a grid of samples per cell.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ddim::eval::{Evaluator, Scores};
use ddim::image_io;
use ddim::pipeline;
use ddim::scheduler::DDIMScheduler;
use ddim::train::{Dataset, Fit, BUILTIN_DATASETS};

use crate::common::{self, ComputeArgs, ModelArgs};
use crate::plot::{self, LineChart, Series};
use crate::run_record::{read_record, write_record, RunRecord, RECORD_NAME};
use crate::UsageError;
use ddim::scheduler::SchedulerKind;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The real images (for the table and the reconstruction experiment): a built-in set
    /// (digits: 1,797 8×8; mnist5k: 5,000 28×28), which gets every metric, or a folder of
    /// PNG/JPEG images of the model's size and channels, which gets the pixel-space FD only.
    #[arg(long, value_name = "digits|mnist5k|DIR")]
    pub data: Option<String>,
    /// The numbers of DDIM steps, comma-separated (the table's columns) [default:
    /// 10,20,50,100,1000]; for the nfe experiment, the numbers of UNet calls [default:
    /// 5,10,15,20,50,100].
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// The values of DDIM's η, comma-separated (the rows): 0 is deterministic DDIM, 1 has
    /// DDPM's variance.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.2,0.5,1.0",
        allow_negative_numbers = true
    )]
    pub eta: Vec<f64>,
    /// Images sampled per (eta, steps) cell [default: 1000; 64 for the consistency and
    /// reconstruction experiments].
    #[arg(long, short = 'n')]
    pub num_samples: Option<usize>,
    /// Images per model call.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// The seed of the starting noises (the same in every cell).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The neighbourhood size k of precision and recall.
    #[arg(long, default_value_t = ddim::eval::DEFAULT_K)]
    pub k: usize,
    /// The folder for metrics.csv, metrics.png and the sample grids [default: eval; for
    /// another experiment eval-EXPERIMENT].
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// What to run: the quality table over η and steps (the paper's Table 1), consistency
    /// (§5.2: the same x_T at every --steps count, distance to the most steps' image, per
    /// --sampler and η), reconstruction (§5.4: --data images inverted and decoded at each
    /// --steps count, the error against S), nfe (quality and distance to the ODE's solution
    /// against UNet calls, per --sampler, with each sampler's fitted order) or interpolation
    /// (§5.3 on real images: pairs of --data images inverted at the first --steps count, the
    /// slerp between their x_T decoded, a strip per pair).
    #[arg(long, value_enum, default_value = "table")]
    pub experiment: Experiment,
    /// The samplers of the consistency and nfe experiments, comma-separated (short or diffusers
    /// class names, as `ddim sample --scheduler`); in consistency DDIM runs once per --eta
    /// [default: ddim; for nfe ddim,dpm++2m,dpm++3m,unipc,deis,euler,heun,pndm,lms].
    #[arg(long, value_delimiter = ',')]
    pub sampler: Vec<String>,
    /// The nfe experiment's reference: DDIM at η = 0 with this many steps, from the same x_T,
    /// for each sampler's distance to the ODE's solution.
    #[arg(long, default_value_t = 1000)]
    pub reference_steps: usize,
    /// Replace the results of an earlier run in --output.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue the run in --output: the cells already in its metrics.csv are kept, not
    /// sampled again, and new --steps or --eta values add cells. The model, its scheduler
    /// config, --data, -n, --seed, --k and --dtype must be those of the run (its ddim-run.json
    /// keeps them).
    #[arg(long)]
    pub resume: bool,
}

/// The experiments of `ddim eval`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experiment {
    Table,
    Consistency,
    Reconstruction,
    Nfe,
    Interpolation,
}

impl Experiment {
    pub fn name(self) -> &'static str {
        match self {
            Experiment::Table => "table",
            Experiment::Consistency => "consistency",
            Experiment::Reconstruction => "reconstruction",
            Experiment::Nfe => "nfe",
            Experiment::Interpolation => "interpolation",
        }
    }
}

impl EvalArgs {
    /// Images per cell (or per run of an experiment).
    pub fn n(&self) -> usize {
        self.num_samples.unwrap_or(match self.experiment {
            Experiment::Table | Experiment::Nfe => 1000,
            Experiment::Interpolation => 8,
            _ => 64,
        })
    }

    /// `--steps`, or the experiment's default.
    pub fn step_list(&self) -> Vec<usize> {
        if !self.steps.is_empty() {
            return self.steps.clone();
        }
        match self.experiment {
            Experiment::Nfe => vec![5, 10, 15, 20, 50, 100],
            Experiment::Interpolation => vec![50],
            _ => vec![10, 20, 50, 100, 1000],
        }
    }

    /// `--sampler`, or the experiment's default.
    pub fn samplers(&self) -> Vec<String> {
        if !self.sampler.is_empty() {
            return self.sampler.clone();
        }
        let names: &[&str] = match self.experiment {
            Experiment::Nfe => &[
                "ddim", "dpm++2m", "dpm++3m", "unipc", "deis", "euler", "heun", "pndm", "lms",
            ],
            _ => &["ddim"],
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// `--data`, which the table and the reconstruction experiment need.
    pub fn data(&self) -> Result<&str> {
        self.data.as_deref().ok_or_else(|| {
            usage(format!(
                "--data is needed for the {} experiment: a built-in set (digits, mnist5k) or a \
                 folder of real images",
                self.experiment.name()
            ))
        })
    }

    /// The output folder.
    pub fn out(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| match self.experiment {
                Experiment::Table => PathBuf::from("eval"),
                other => PathBuf::from(format!("eval-{}", other.name())),
            })
    }
}

/// What makes the cells of two runs comparable, for `--resume`: the run record of the folder.
fn record_of(args: &EvalArgs, model: &common::Model) -> Result<RunRecord> {
    let mut r = model.run_record("eval", SchedulerKind::Ddim, &args.compute)?;
    r.set("data", args.data()?)
        .set("num_samples", args.n())
        .set("seed", args.seed)
        .set("k", args.k);
    Ok(r)
}

/// The settings file of runs made before the run record (ddim 0.1 before the record).
const LEGACY_SETTINGS: &str = "eval_settings.json";

/// One metric: its CSV column, its title, and how it reads a cell's scores.
struct Metric {
    column: &'static str,
    title: &'static str,
    digits: usize,
    get: fn(&Scores) -> Option<f64>,
}

const METRICS: [Metric; 7] = [
    Metric {
        column: "fd_pixels",
        title: "FD in pixel space (lower is better)",
        digits: 3,
        get: |s| Some(s.fd_pixels),
    },
    Metric {
        column: "fd_classifier",
        title: "FD in classifier features (lower is better)",
        digits: 3,
        get: |s| s.fd_features,
    },
    Metric {
        column: "precision",
        title: "precision (higher is better)",
        digits: 3,
        get: |s| s.precision,
    },
    Metric {
        column: "recall",
        title: "recall (higher is better)",
        digits: 3,
        get: |s| s.recall,
    },
    Metric {
        column: "class_entropy_bits",
        title: "entropy of predicted classes, bits (3.32 = all ten equally often)",
        digits: 3,
        get: |s| s.class_entropy,
    },
    Metric {
        column: "top_class_share",
        title: "share of the most common predicted class (0.1 = balanced)",
        digits: 3,
        get: |s| s.top_class_share,
    },
    Metric {
        column: "classifier_score",
        title: "classifier score, exp E KL(p(y|x) || p(y)) (higher is better; real data's above)",
        digits: 3,
        get: |s| s.class_score,
    },
];

/// A finished cell.
#[derive(Debug)]
struct Cell {
    eta: f64,
    steps: usize,
    scores: Scores,
    seconds: f64,
}

fn usage(msg: String) -> anyhow::Error {
    UsageError(msg).into()
}

/// `ddim eval`: check the grid and the model, open (or resume) the output folder, fit the real
/// data's statistics, sample and score every cell not done yet, then write the table and plot.
pub fn run(args: EvalArgs) -> Result<()> {
    if args.experiment != Experiment::Table {
        if args.resume {
            return Err(usage(format!(
                "--resume continues a table run; the {} experiment starts afresh (--overwrite \
                 replaces its files)",
                args.experiment.name()
            )));
        }
        return crate::experiments::run(&args, args.experiment);
    }
    let started = Instant::now();
    let (steps, etas) = check_grid(&args)?;
    let model = common::load_model(&args.model, None, args.compute.dtype.dtype())?;
    model.check_scheduler_class()?;
    let [_, channels, height, _] = check_model(&model, &steps)?;
    let real = open_real(args.data()?, channels, height)?;
    let mut cells = open_folder(&args, &model)?;
    let evaluator = real_statistics(&real, args.k)?;
    let todo: Vec<(f64, usize)> = etas
        .iter()
        .flat_map(|&eta| steps.iter().map(move |&s| (eta, s)))
        .filter(|&(eta, s)| !cells.iter().any(|c| c.eta == eta && c.steps == s))
        .collect();
    let n = args.n();
    let total = todo.iter().map(|&(_, s)| (n * s) as u64).sum();
    let bar = common::progress(total, args.model.quiet, "eval", "image-steps");
    for (eta, s) in todo {
        bar.set_message(format!("eta {eta}, {s} steps"));
        let cell = sample_cell(&args, &model, &evaluator, eta, s, &bar)?;
        cells.push(cell);
        // Written after every cell, so an interrupted run keeps the finished cells.
        write_csv(&args.out().join("metrics.csv"), &cells, n)?;
    }
    bar.finish_and_clear();
    report(&args, &model, &real, &evaluator, cells, (etas, steps))?;
    eprintln!("in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The model's image shape, after checking that eval can score it and take every step count.
fn check_model(model: &common::Model, steps: &[usize]) -> Result<[usize; 4]> {
    let shape = pipeline::noise_shape(&model.unet, 1)?;
    let [_, channels, height, width] = shape;
    if height != width {
        return Err(usage(format!(
            "the model makes {height}×{width} images; ddim eval compares square images"
        )));
    }
    let dim = channels * height * width;
    if dim > ddim::eval::frechet::MAX_DIM {
        return Err(usage(format!(
            "the model makes {channels}×{height}×{width} images ({dim} values each); the \
             pixel-space FD fits a covariance over every value and supports at most {} (e.g. \
             32×32 RGB or 64×64 grayscale)",
            ddim::eval::frechet::MAX_DIM
        )));
    }
    // Every step count must be one the scheduler can take, before minutes of sampling.
    let mut scheduler = DDIMScheduler::new(&model.scheduler_config)?;
    for &s in steps {
        scheduler.set_timesteps(s).map_err(|e| {
            usage(format!(
                "--steps {s}: {e} (the model was trained with {} timesteps)",
                model.scheduler_config.num_train_timesteps
            ))
        })?;
    }
    Ok(shape)
}

/// Claims `--output` for this run: with `--resume`, the finished cells of the run there (which
/// must have this run's settings); otherwise an empty folder (or `--overwrite`). The record is
/// written before the first cell.
fn open_folder(args: &EvalArgs, model: &common::Model) -> Result<Vec<Cell>> {
    let csv_path = args.out().join("metrics.csv");
    let png_path = args.out().join("metrics.png");
    let record_path = args.out().join(RECORD_NAME);
    let legacy_path = args.out().join(LEGACY_SETTINGS);
    let record = record_of(args, model)?;
    image_io::ensure_writable_dir(&args.out())?;
    let cells: Vec<Cell> = if args.resume {
        let done = read_run(&args.out(), &csv_path, &record, args.n())?;
        eprintln!(
            "resuming {}: {} finished cell(s) kept",
            args.out().display(),
            done.len()
        );
        done
    } else {
        for path in [&csv_path, &png_path, &record_path, &legacy_path] {
            common::refuse_existing(path, args.overwrite)?;
        }
        if legacy_path.exists() {
            std::fs::remove_file(&legacy_path)
                .with_context(|| format!("removing {} (--overwrite)", legacy_path.display()))?;
        }
        Vec::new()
    };
    write_record(&record_path, &record)
        .with_context(|| format!("writing {}", record_path.display()))?;
    Ok(cells)
}

/// The real data's statistics (and the classifier, for the built-in sets), with what they are.
pub fn real_statistics(real: &Dataset, k: usize) -> Result<Evaluator> {
    let (channels, size) = (real.channels, real.size);
    eprintln!(
        "real: {} ({} images of {channels}×{size}×{size}); computing its statistics",
        real.source, real.len
    );
    let stats_started = Instant::now();
    let evaluator = Evaluator::new(real, k)?;
    eprintln!(
        "real statistics in {:.1} s",
        stats_started.elapsed().as_secs_f64()
    );
    match evaluator.classifier_accuracy() {
        Some(acc) => eprintln!(
            "classifier: the shipped {} classifier, {:.2}% accurate on the held-out real images; \
             the real images' classifier score is {:.3}",
            real.source,
            100.0 * acc,
            evaluator.real_class_score().unwrap_or(f64::NAN)
        ),
        None => eprintln!(
            "note: the feature metrics (FD in classifier features, precision, recall, predicted \
             classes) need a built-in set with its classifier (--data digits or mnist5k); for \
             {} only the pixel-space FD is computed",
            real.source
        ),
    }
    Ok(evaluator)
}

/// Samples and scores one cell (η, steps): `-n` images from the same x_T as every other cell,
/// its grid of the first batch written.
fn sample_cell(
    args: &EvalArgs,
    model: &common::Model,
    evaluator: &Evaluator,
    eta: f64,
    s: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Cell> {
    let (n, batch) = (args.n(), args.batch_size.min(args.n()));
    let cell_started = Instant::now();
    // The same x_T (and noise streams) for image i in every cell.
    let row = crate::experiments::Row {
        label: format!("eta {eta}"),
        kind: SchedulerKind::Ddim,
        config: model.scheduler_config.clone(),
        eta,
    };
    let x0 = crate::experiments::sample_first(args, model, &row, s, n, bar)
        .with_context(|| format!("at eta {eta}, {s} steps"))?;
    let samples = x0.flatten_all()?.to_vec1::<f32>()?;
    let seconds = cell_started.elapsed().as_secs_f64();
    let scoring_started = Instant::now();
    let scores = evaluator
        .score(&samples, n)
        .with_context(|| format!("scoring the samples of eta {eta}, {s} steps"))?;
    let scoring = scoring_started.elapsed().as_secs_f64();
    // the grid of the first batch
    save_grid(
        &x0.narrow(0, 0, batch)?,
        &args.out().join(grid_name(eta, s)),
    )?;
    // (println on the bar would print nothing where stderr is not a terminal)
    bar.suspend(|| eprintln!("{}", cell_line(eta, s, &scores, seconds, scoring)));
    Ok(Cell {
        eta,
        steps: s,
        scores,
        seconds,
    })
}

/// Writes the folder's table (every cell, old and new, in order) and plot, and prints a table
/// per metric.
fn report(
    args: &EvalArgs,
    model: &common::Model,
    real: &Dataset,
    evaluator: &Evaluator,
    mut cells: Vec<Cell>,
    (mut etas, mut steps): (Vec<f64>, Vec<usize>),
) -> Result<()> {
    let n = args.n();
    let csv_path = args.out().join("metrics.csv");
    let png_path = args.out().join("metrics.png");
    // A resumed run's table and plot show every cell of the folder, old and new.
    for c in &cells {
        if !etas.contains(&c.eta) {
            etas.push(c.eta);
        }
        if !steps.contains(&c.steps) {
            steps.push(c.steps);
        }
    }
    etas.sort_by(f64::total_cmp);
    steps.sort_unstable();
    cells.sort_by(|a, b| a.eta.total_cmp(&b.eta).then(a.steps.cmp(&b.steps)));
    write_csv(&csv_path, &cells, n)?;
    write_plot(&png_path, &cells, &etas, evaluator.has_features())?;
    say!(
        "DDIM samples of {} against {} ({n} samples per cell, seed {}, k = {}):",
        model.source,
        real.source,
        args.seed,
        args.k
    );
    for metric in METRICS.iter() {
        if cells.iter().any(|c| (metric.get)(&c.scores).is_some()) {
            say!("\n{}", table(metric, &cells, &etas, &steps));
        }
    }
    eprint!(
        "wrote {}, {} and {} sample grids ",
        csv_path.display(),
        png_path.display(),
        cells.len(),
    );
    Ok(())
}

/// The step counts (ascending, without repeats) and etas (likewise) after checking them.
fn check_grid(args: &EvalArgs) -> Result<(Vec<usize>, Vec<f64>)> {
    if args.eta.is_empty() {
        return Err(usage(
            "--eta needs at least one value (e.g. --eta 0,1)".into(),
        ));
    }
    if let Some(&s) = args.step_list().iter().find(|&&s| s == 0) {
        return Err(usage(format!(
            "--steps {s}: each step count must be at least 1 (e.g. --steps 10,20,50,100,1000)"
        )));
    }
    if let Some(&e) = args.eta.iter().find(|e| !(e.is_finite() && **e >= 0.0)) {
        return Err(usage(format!(
            "--eta {e}: each eta must be a finite number >= 0 (0 is deterministic DDIM, 1 has \
             DDPM's variance)"
        )));
    }
    let min_n = (args.k + 1).max(2);
    if args.n() < min_n {
        return Err(usage(format!(
            "--num-samples {}: at least {min_n} images per cell are needed (a covariance needs \
             2, precision/recall with k = {} need k + 1); the paper's tables use thousands",
            args.n(),
            args.k
        )));
    }
    if args.k == 0 {
        return Err(usage(
            "--k 0: precision and recall need at least 1 neighbour".into(),
        ));
    }
    if args.batch_size == 0 {
        return Err(usage("--batch-size 0: must be at least 1".into()));
    }
    let mut steps = args.step_list();
    steps.sort_unstable();
    steps.dedup();
    let mut etas = args.eta.clone();
    etas.sort_by(f64::total_cmp);
    etas.dedup();
    Ok((steps, etas))
}

/// The real set, checked against the model's images.
pub fn open_real(spec: &str, channels: usize, size: usize) -> Result<Dataset> {
    let folder = Path::new(spec);
    if BUILTIN_DATASETS.contains(&spec) && !folder.is_dir() {
        let set = Dataset::builtin(spec, None, Fit::Crop)?;
        if set.channels != channels || set.size != size {
            return Err(usage(format!(
                "--data {spec}: holds {}×{}×{} images, but the model makes {channels}×{size}×{size} \
                 images; evaluate a model trained on {spec} at its own size, or give --data a \
                 folder of {channels}-channel {size}×{size} images",
                set.channels, set.size, set.size
            )));
        }
        return Ok(set);
    }
    if !folder.is_dir() {
        return Err(usage(format!(
            "--data {spec}: neither a built-in set ({}) nor a folder of images",
            BUILTIN_DATASETS.join(", ")
        )));
    }
    // The images must already be of the model's size: resizing would change the statistics.
    for path in ddim::train::data::image_files(folder)? {
        if let Ok((w, h)) = image::image_dimensions(&path) {
            if (w as usize, h as usize) != (size, size) {
                return Err(usage(format!(
                    "--data {spec}: {} is {w}×{h} pixels, but the model makes {size}×{size} \
                     images; give a folder of {size}×{size} images",
                    path.display()
                )));
            }
        }
    }
    let set = Dataset::from_folder(folder, size, None, Fit::Crop)?;
    for (path, why) in &set.skipped {
        eprintln!("warning: skipping {}: {why}", path.display());
    }
    if set.channels != channels {
        let kind = |c: usize| if c == 1 { "grayscale" } else { "RGB" };
        return Err(usage(format!(
            "--data {spec}: the images are {} ({} channel(s)), but the model makes {} images \
             ({channels} channel(s)); give a folder of {} images",
            kind(set.channels),
            set.channels,
            kind(channels),
            kind(channels)
        )));
    }
    if set.len < 2 {
        return Err(usage(format!(
            "--data {spec}: {} readable image(s); a covariance needs at least 2",
            set.len
        )));
    }
    Ok(set)
}

fn grid_name(eta: f64, steps: usize) -> String {
    format!("samples_eta{eta}_steps{steps}.png")
}

/// The first batch's first 64 images as a grid.
fn save_grid(x0: &candle_core::Tensor, path: &Path) -> Result<()> {
    let k = x0.dim(0)?.min(64);
    let images = image_io::to_images(&x0.narrow(0, 0, k)?)?;
    let scale = if x0.dim(2)? < 32 { 2 } else { 1 };
    let images = images
        .iter()
        .map(|img| image_io::upscale_nearest(img, scale))
        .collect::<ddim::Result<Vec<_>>>()?;
    image_io::save_png(&image_io::make_grid(&images, None, 2)?, path)?;
    Ok(())
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(String::new, |v| format!("{v:.digits$}"))
}

fn cell_line(eta: f64, steps: usize, s: &Scores, seconds: f64, scoring: f64) -> String {
    let mut line = format!(
        "eta {eta:<4} steps {steps:<5} FD(pixels) {:>9.3}",
        s.fd_pixels
    );
    if let (Some(fd), Some(p), Some(r)) = (s.fd_features, s.precision, s.recall) {
        let _ = write!(
            line,
            "  FD(classifier) {fd:>8.3}  precision {p:.3}  recall {r:.3}"
        );
    }
    let _ = write!(
        line,
        "  (sampled in {seconds:.1} s, scored in {scoring:.1} s)"
    );
    line
}

/// One metric as a table: a row per eta, a column per step count.
fn table(metric: &Metric, cells: &[Cell], etas: &[f64], steps: &[usize]) -> String {
    let width = 10;
    let mut out = format!("{}\n{:<12}", metric.title, "eta \\ steps");
    for s in steps {
        let _ = write!(out, "{s:>width$}");
    }
    for &eta in etas {
        let _ = write!(out, "\n{:<12}", eta);
        for &s in steps {
            let v = cells
                .iter()
                .find(|c| c.eta == eta && c.steps == s)
                .and_then(|c| (metric.get)(&c.scores));
            let _ = write!(out, "{:>width$}", fmt(v, metric.digits));
        }
    }
    out
}

fn write_csv(path: &Path, cells: &[Cell], n: usize) -> Result<()> {
    let text = csv_text(cells, n);
    ddim::atomic::write_atomically(path, |w| w.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn csv_text(cells: &[Cell], n: usize) -> String {
    let mut text = String::from("eta,steps,num_samples");
    for m in METRICS.iter() {
        text.push(',');
        text.push_str(m.column);
    }
    text.push_str(",sampling_seconds\n");
    for c in cells {
        let _ = write!(text, "{},{},{n}", c.eta, c.steps);
        for m in METRICS.iter() {
            // full precision in the file; empty where a metric does not apply
            let _ = write!(
                text,
                ",{}",
                (m.get)(&c.scores).map_or(String::new(), |v| v.to_string())
            );
        }
        let _ = writeln!(text, ",{:.3}", c.seconds);
    }
    text
}

/// The finished cells of the run in `dir`, after checking that its settings are `now`'s.
fn read_run(dir: &Path, csv_path: &Path, now: &RunRecord, n: usize) -> Result<Vec<Cell>> {
    let Some(then) = read_record(&dir.join(RECORD_NAME))? else {
        let why = if dir.join(LEGACY_SETTINGS).exists() {
            format!(
                "it was made before ddim recorded every setting of a run ({LEGACY_SETTINGS} \
                 lacks the model's hash and scheduler config), so its cells cannot be matched \
                 to this run's; use another --output, or --overwrite instead of --resume"
            )
        } else {
            format!(
                "it holds no {RECORD_NAME}, which ddim eval writes at the start of a run, so \
                 there is no run to continue (drop --resume to start one)"
            )
        };
        return Err(usage(format!("--resume: {}: {why}", dir.display())));
    };
    let differences = then.differences(now);
    if !differences.is_empty() {
        return Err(usage(format!(
            "--resume: the run in {} used other settings:\n  {}\ncells of different settings \
             are not comparable (use another --output, or the run's settings)",
            dir.display(),
            differences
                .iter()
                .map(|d| d.describe("in the folder"))
                .collect::<Vec<_>>()
                .join("\n  ")
        )));
    }
    if !csv_path.exists() {
        return Ok(Vec::new()); // stopped before its first cell finished
    }
    let text = std::fs::read_to_string(csv_path)
        .with_context(|| format!("reading {}", csv_path.display()))?;
    parse_csv(&text, n).map_err(|e| {
        usage(format!(
            "--resume: {}: {e} (it should be the metrics.csv ddim eval wrote)",
            csv_path.display()
        ))
    })
}

/// The cells of a `metrics.csv` written by [`write_csv`] for `n` samples per cell.
fn parse_csv(text: &str, n: usize) -> std::result::Result<Vec<Cell>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty file")?.split(',').collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|&c| c == name)
            .ok_or_else(|| format!("no column `{name}`"))
    };
    let (eta_at, steps_at, n_at, seconds_at) = (
        column("eta")?,
        column("steps")?,
        column("num_samples")?,
        column("sampling_seconds")?,
    );
    let metric_at = METRICS
        .iter()
        .map(|m| column(m.column))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut cells = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: Vec<&str> = line.split(',').collect();
        let bad = |what: &str| format!("line {}: bad {what} in `{line}`", i + 2);
        let field = |at: usize| row.get(at).copied().unwrap_or("");
        let number = |at: usize, what: &str| -> std::result::Result<Option<f64>, String> {
            match field(at) {
                "" => Ok(None),
                v => v.parse::<f64>().map(Some).map_err(|_| bad(what)),
            }
        };
        if row.len() != header.len() {
            return Err(bad("number of fields"));
        }
        let eta = number(eta_at, "eta")?.ok_or_else(|| bad("eta"))?;
        let steps: usize = field(steps_at).parse().map_err(|_| bad("steps"))?;
        if field(n_at).parse::<usize>().ok() != Some(n) {
            return Err(bad("num_samples (not this run's)"));
        }
        let m = |i: usize| number(metric_at[i], METRICS[i].column);
        let scores = Scores {
            fd_pixels: m(0)?.ok_or_else(|| bad("fd_pixels"))?,
            fd_features: m(1)?,
            precision: m(2)?,
            recall: m(3)?,
            class_entropy: m(4)?,
            top_class_share: m(5)?,
            class_score: m(6)?,
        };
        let seconds = number(seconds_at, "sampling_seconds")?.unwrap_or(0.0);
        cells.push(Cell {
            eta,
            steps,
            scores,
            seconds,
        });
    }
    Ok(cells)
}

/// Each metric against steps (log x), one line per eta.
fn write_plot(path: &Path, cells: &[Cell], etas: &[f64], features: bool) -> Result<()> {
    let shown: &[usize] = if features { &[0, 1, 2, 3] } else { &[0] };
    let charts: Vec<LineChart> = shown
        .iter()
        .map(|&i| {
            let m = &METRICS[i];
            LineChart {
                title: m.title.to_string(),
                x_label: "DDIM steps".into(),
                y_label: m.column.to_string(),
                log_x: true,
                log_y: false,
                series: etas
                    .iter()
                    .map(|&eta| Series {
                        name: format!("eta = {eta}"),
                        points: cells
                            .iter()
                            .filter(|c| c.eta == eta)
                            .filter_map(|c| Some((c.steps as f64, (m.get)(&c.scores)?)))
                            .collect(),
                    })
                    .collect(),
            }
        })
        .collect();
    if let [one] = charts.as_slice() {
        plot::save_line_chart(path, one, (720, 480))
    } else {
        plot::save_panels(path, &charts, 2, (720, 480))
    }
    .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(fd: f64) -> Scores {
        Scores {
            fd_pixels: fd,
            fd_features: None,
            precision: None,
            recall: None,
            class_entropy: None,
            top_class_share: None,
            class_score: None,
        }
    }

    /// What `--resume` reads back is what was written, to the last bit; damaged files are
    /// refused with the line named.
    #[test]
    fn csv_round_trips_and_bad_files_are_refused() {
        let mut full = scores(57.123_456_789_012_34);
        full.fd_features = Some(1.0 / 3.0);
        full.precision = Some(0.75);
        full.recall = Some(0.8);
        full.class_entropy = Some(3.2);
        full.top_class_share = Some(0.165);
        full.class_score = Some(8.765_432_1);
        let cells = vec![
            Cell {
                eta: 0.2,
                steps: 10,
                scores: full,
                seconds: 18.234,
            },
            Cell {
                eta: 1.0,
                steps: 1000,
                scores: scores(2.5),
                seconds: 1.5,
            },
        ];
        let text = csv_text(&cells, 200);
        let back = parse_csv(&text, 200).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in cells.iter().zip(&back) {
            assert_eq!((a.eta, a.steps, a.seconds), (b.eta, b.steps, b.seconds));
            for m in METRICS.iter() {
                assert_eq!((m.get)(&a.scores), (m.get)(&b.scores), "{}", m.column);
            }
        }
        assert!(parse_csv(&text, 100).unwrap_err().contains("num_samples"));
        let cut = text.replace(",18.234", "");
        assert!(parse_csv(&cut, 200).unwrap_err().contains("line 2"));
        let garbled = text.replace("57.12", "x57.12");
        assert!(parse_csv(&garbled, 200).unwrap_err().contains("fd_pixels"));
        assert!(parse_csv("", 200).is_err());
        assert!(parse_csv("eta,steps\n", 200)
            .unwrap_err()
            .contains("num_samples"));
    }

    #[test]
    fn tables_have_a_row_per_eta_and_a_column_per_step_count() {
        let cells = vec![
            Cell {
                eta: 0.0,
                steps: 10,
                scores: scores(1.5),
                seconds: 1.0,
            },
            Cell {
                eta: 0.0,
                steps: 20,
                scores: scores(1.25),
                seconds: 1.0,
            },
            Cell {
                eta: 1.0,
                steps: 10,
                scores: scores(3.0),
                seconds: 1.0,
            },
        ];
        let t = table(&METRICS[0], &cells, &[0.0, 1.0], &[10, 20]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].ends_with("10        20"), "{t}");
        assert!(
            lines[2].starts_with('0') && lines[2].ends_with("1.500     1.250"),
            "{t}"
        );
        // a missing cell is blank
        assert!(
            lines[3].starts_with('1') && lines[3].trim_end().ends_with("3.000"),
            "{t}"
        );
    }
}
