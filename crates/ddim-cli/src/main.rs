//! The `ddim` command line: parses arguments, calls the `ddim` library, reports errors.
//! Exit codes: 0 success, 2 bad input or usage, 1 an internal error, 130 interrupted by Ctrl-C
//! (`sample` and `train`, which exit with it themselves after files are left complete).

/// `println!` that ignores a closed stdout (`ddim inspect | head` must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod common;
mod convert_cmd;
mod eval_cmd;
mod experiments;
mod inpaint_cmd;
mod inspect_cmd;
mod interpolate_cmd;
mod invert_cmd;
mod plot;
mod run_record;
mod sample_cmd;
mod schedule_cmd;
mod serve;
mod train_classifier_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// DDIM and DDPM sampling for diffusers-compatible models, in one binary.
#[derive(Parser, Debug)]
#[command(name = "ddim", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sample images with DDIM or DDPM from a diffusers model folder or hub id.
    Sample(sample_cmd::SampleArgs),
    /// Invert an image to its DDIM noise x_T (and optionally decode it back).
    Invert(invert_cmd::InvertArgs),
    /// Interpolate between the noise of two seeds (spherical) and sample each frame.
    Interpolate(interpolate_cmd::InterpolateArgs),
    /// Repaint the masked part of an image (RePaint, as diffusers' RePaintPipeline).
    Inpaint(inpaint_cmd::InpaintArgs),
    /// Show a model's configs, parameter count and what `sample` would run.
    Inspect(inspect_cmd::InspectArgs),
    /// Print the timesteps and noise levels a scheduler config gives for N inference steps.
    Schedule(schedule_cmd::ScheduleArgs),
    /// Rewrite a model as a diffusers pipeline folder (safetensors, f32/f16/bf16).
    Convert(convert_cmd::ConvertArgs),
    /// Train a UNet with the DDPM objective on a folder of images or a built-in digit set.
    Train(train_cmd::TrainArgs),
    /// The DDIM paper's experiments on a model: quality for each steps × eta (Table 1),
    /// consistency, reconstruction, quality against UNet calls per sampler.
    Eval(eval_cmd::EvalArgs),
    /// A browser playground on a local HTTP server: sample with live x_t and x̂0 previews.
    Serve(serve::ServeArgs),
    /// Train the digit classifier behind `ddim eval`'s feature metrics (for maintainers: the
    /// shipped weights in crates/ddim/assets/ were made with it).
    #[command(hide = true)]
    TrainClassifier(train_classifier_cmd::TrainClassifierArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ddim::configure_cpu_threads();
    let result = match cli.command {
        Command::Sample(args) => sample_cmd::run(args),
        Command::Invert(args) => invert_cmd::run(args),
        Command::Interpolate(args) => interpolate_cmd::run(args),
        Command::Inpaint(args) => inpaint_cmd::run(args),
        Command::Inspect(args) => inspect_cmd::run(args),
        Command::Schedule(args) => schedule_cmd::run(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Convert(args) => convert_cmd::run(args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Serve(args) => serve::run(args),
        Command::TrainClassifier(args) => train_classifier_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            // Library errors already carry their source in their message: skip repeats.
            let mut last = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !last.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                last = text;
            }
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The exit code of every error, in one place: 2 when it comes from what the user gave us
/// (arguments, files; the library's [`ddim::ErrorKind::Input`] or our [`UsageError`]), 1 for
/// a failure of the run itself.
fn exit_code(err: &anyhow::Error) -> u8 {
    let user_error = err.chain().any(|cause| {
        cause.downcast_ref::<UsageError>().is_some()
            || cause
                .downcast_ref::<ddim::Error>()
                .is_some_and(|e| e.kind() == ddim::ErrorKind::Input)
    });
    if user_error {
        2
    } else {
        1
    }
}

/// A bad combination of arguments found after parsing.
#[derive(Debug)]
pub(crate) struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
