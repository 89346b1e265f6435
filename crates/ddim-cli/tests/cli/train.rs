//! `ddim train`: a diffusers folder, resume, no clobbering, bad input and Ctrl-C.

use std::process::Command;

use crate::common::*;

/// `ddim train` on the built-in 8×8 digits with the tiny preset, batch 4, quietly.
fn train_cmd(out: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddim"));
    c.args([
        "train",
        "--data",
        "digits",
        "-q",
        "--batch-size",
        "4",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "5",
        "--preset",
        "tiny",
        "-o",
    ])
    .arg(out)
    .args(args);
    c
}

fn train_losses(dir: &std::path::Path) -> Vec<f32> {
    ddim::train::load_state(dir, &candle_core::Device::Cpu)
        .unwrap()
        .losses()
        .to_vec()
}

#[test]
fn train_saves_a_diffusers_folder_resumes_and_never_clobbers() {
    let dir = tmp("train");
    let a = dir.join("a");
    // (constant learning rate: raising --steps on resume changes a cosine schedule)
    let o = train_cmd(
        &a,
        &[
            "--steps",
            "4",
            "--save-every",
            "2",
            "--lr-schedule",
            "constant",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("trained 4 steps"));
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "training_state.safetensors",
    ] {
        assert!(a.join(f).is_file(), "{f}");
    }
    let curve = image::open(a.join("loss.png")).unwrap();
    assert_eq!((curve.width(), curve.height()), (800, 450));

    // the same command again would overwrite the run: refused
    let o = train_cmd(&a, &["--steps", "4"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    // a resumed run keeps its settings
    let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args([
            "train", "--data", "digits", "-q", "--resume", "--lr", "1", "-o",
        ])
        .arg(&a)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--lr"), "{}", stderr(&o));

    // resume for two more steps = six steps straight
    let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args([
            "train", "--data", "digits", "-q", "--resume", "--steps", "6", "-o",
        ])
        .arg(&a)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let b = dir.join("b");
    let o = train_cmd(&b, &["--steps", "6", "--lr-schedule", "constant"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (la, lb) = (train_losses(&a), train_losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb);

    // what it saved samples like any model folder
    let out = dir.join("samples");
    let o = ddim(&[
        "sample",
        "--model",
        a.to_str().unwrap(),
        "-n",
        "2",
        "--steps",
        "3",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(count_pngs(&out), 2);
}

#[test]
fn train_rejects_bad_input_with_exit_code_2() {
    let dir = tmp("train-bad");
    let cases: [(&[&str], &str); 6] = [
        (&["--steps", "0"], "steps"),
        (&["--prediction-type", "noise"], "noise"),
        (&["--lr", "-1"], "lr"),
        (&["--fit", "zoom"], "zoom"),
        (&["--ema-decay", "1.5"], "ema-decay"),
        (&["--save-every", "0"], "save-every"),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let o = train_cmd(&dir.join(i.to_string()), args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    let o = ddim(&["train", "--data", "digits", "--preset", "huge", "-o", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("huge"), "{}", stderr(&o));
    let o = ddim(&[
        "train",
        "--data",
        "/no/such/folder",
        "--resolution",
        "8",
        "-o",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no/such/folder"), "{}", stderr(&o));
    let o = ddim(&[
        "train",
        "--data",
        "digits",
        "--resume",
        "-o",
        "/no/such/run",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no training state"), "{}", stderr(&o));
}

#[cfg(unix)]
#[test]
fn train_ctrl_c_saves_and_the_resumed_run_matches() {
    let dir = tmp("train-ctrl-c");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let steps = "40";
    // Wait for the first checkpoint: the Ctrl-C handler is installed by then.
    let child = spawn_until(
        &mut train_cmd(&a, &["--steps", steps, "--save-every", "1"]),
        std::process::Stdio::piped(),
        300,
        || a.join("training_state.safetensors").exists(),
    );
    let r = interrupt(child);
    if r.status.code() != Some(0) {
        // (0 only if the run finished before the signal came.)
        assert_eq!(r.status.code(), Some(130), "{}", stderr(&r));
        assert!(stderr(&r).contains("--resume"), "{}", stderr(&r));
        let done = train_losses(&a).len();
        assert!((1..40).contains(&done), "{done}");
        let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
            .args(["train", "--data", "digits", "-q", "--resume", "-o"])
            .arg(&a)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = train_cmd(&b, &["--steps", steps]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(train_losses(&a), train_losses(&b));
}

/// `--init-from` starts a run from a model's weights (raw and EMA) and noise schedule, records
/// where they came from, resumes without the flag, and refuses what does not fit.
#[test]
fn train_init_from_starts_at_the_given_weights() {
    let dir = tmp("train-init");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let o = train_cmd(&a, &["--steps", "3"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // a tiny learning rate: one AdamW step moves each weight by about lr at most
    let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args([
            "train",
            "--data",
            "digits",
            "--batch-size",
            "4",
            "--steps",
            "1",
        ])
        .args(["--lr", "1e-6", "--seed", "9", "--init-from"])
        .arg(&a)
        .arg("-o")
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("starting from the weights of"),
        "{}",
        stderr(&o)
    );
    let cpu = candle_core::Device::Cpu;
    let start = ddim::train::load_state(&a, &cpu)
        .unwrap()
        .ema_tensors()
        .unwrap();
    let run = ddim::train::load_state(&b, &cpu).unwrap();
    let from = run.config().init_from.clone().unwrap();
    assert!(
        from.contains(a.to_str().unwrap()) && from.contains("UNet sha256"),
        "{from}"
    );
    let trained = run.weights().unwrap();
    assert_eq!(trained.len(), start.len());
    for (name, w) in &trained {
        let diff = (w - &start[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 2e-6, "{name}: {diff} from the --init-from weights");
    }
    // the run resumes with its own settings, without --init-from
    let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args([
            "train", "--data", "digits", "-q", "--resume", "--steps", "2", "-o",
        ])
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // refused: with --preset, with --resume, a model whose channels do not fit the data
    for extra in [&["--preset", "tiny"][..], &["--resume"][..]] {
        let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
            .args(["train", "--data", "digits", "--init-from"])
            .arg(&a)
            .args(extra)
            .arg("-o")
            .arg(dir.join("c"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
    }
    // (the diffusers fixture folder: a 3-channel UNet)
    let o = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args([
            "train",
            "--data",
            "digits",
            "--init-from",
            tiny_model(),
            "-o",
        ])
        .arg(dir.join("d"))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("--init-from") && e.contains("in_channels 3"),
        "{e}"
    );
    assert!(!dir.join("c").exists() && !dir.join("d").exists());
}
