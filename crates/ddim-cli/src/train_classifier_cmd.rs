//! `ddim train-classifier` (hidden, for maintainers): trains the digit classifier whose features
//! `ddim eval` uses, on a built-in set, and writes the float16 safetensors file that is shipped
//! in `crates/ddim/assets/` (see the README there).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ddim::eval::classifier::{self, ClassifierTrainConfig, HELD_OUT_PERCENT};
use ddim::train::{Dataset, Fit};

use crate::common;
use crate::UsageError;

#[derive(Args, Debug)]
pub struct TrainClassifierArgs {
    /// The built-in set: digits (8×8) or mnist5k (28×28).
    #[arg(long, value_name = "digits|mnist5k")]
    pub data: String,
    /// The safetensors file to write.
    #[arg(long, short = 'o', value_name = "FILE.safetensors")]
    pub output: PathBuf,
    /// Passes over the training images [default: 20].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step [default: 64].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// AdamW's peak learning rate [default: 2e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Random shifts of the training images, in pixels [default: size / 14].
    #[arg(long)]
    pub max_shift: Option<usize>,
    /// Seeds the weights, the held-out split and the batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing --output.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: TrainClassifierArgs) -> Result<()> {
    if !ddim::train::BUILTIN_DATASETS.contains(&args.data.as_str()) {
        return Err(UsageError(format!(
            "--data {}: the classifier is trained on a labelled built-in set: digits or mnist5k",
            args.data
        ))
        .into());
    }
    common::refuse_existing(&args.output, args.overwrite)?;
    let data = Dataset::builtin(&args.data, None, Fit::Crop)?;
    let defaults = ClassifierTrainConfig::for_size(data.size);
    let config = ClassifierTrainConfig {
        epochs: args.epochs.unwrap_or(defaults.epochs),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        lr: args.lr.unwrap_or(defaults.lr),
        max_shift: args.max_shift.unwrap_or(defaults.max_shift),
        seed: args.seed,
        ..defaults
    };
    eprintln!(
        "training on {} of {} {} images ({HELD_OUT_PERCENT}% held out), {config:?}",
        data.len - data.len * HELD_OUT_PERCENT / 100,
        data.len,
        args.data
    );
    let started = Instant::now();
    let trained = classifier::train(&data, &config, &mut |s| {
        eprintln!(
            "epoch {:3}  loss {:.4}  held-out accuracy {:.4}  ({:.0} s)",
            s.epoch,
            s.loss,
            s.held_out_accuracy,
            started.elapsed().as_secs_f64()
        );
    })?;
    trained
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    say!(
        "held-out accuracy (float16 weights): {:.4} on {} images; wrote {}",
        trained.info.held_out_accuracy,
        data.len * HELD_OUT_PERCENT / 100,
        args.output.display()
    );
    Ok(())
}
