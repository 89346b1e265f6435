//! Output folders know what made them (`ddim-run.json`): a rerun with other settings is refused
//! with exit code 2 and every difference named, touching nothing; `--overwrite` gives the folder
//! a fresh run would; the same settings resume to the bytes of one uninterrupted run. Also:
//! outputs only where asked, scheduler classes ddim does not implement, diffusers' JSON tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ddim/tests/fixtures/pipeline/tiny-ddpm")
}

/// `ddim sample --model <tiny> -q --steps 3 -n 3 -o <out> <extra>`, run in `cwd`.
fn sample(cwd: &Path, out: Option<&Path>, extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddim"));
    c.current_dir(cwd).arg("sample").arg("-q");
    if !extra.contains(&"--model") {
        c.arg("--model").arg(tiny_model());
    }
    for (flag, default) in [("--steps", "3"), ("-n", "3")] {
        if !extra.contains(&flag) {
            c.args([flag, default]);
        }
    }
    if let Some(out) = out {
        c.arg("-o").arg(out);
    }
    c.args(extra).output().expect("running ddim")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` (relative name -> bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

#[test]
fn a_rerun_with_other_settings_is_refused_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&sample(tmp.path(), Some(&out), &[]));
    assert!(out.join("ddim-run.json").is_file());
    let before = snapshot(&out);
    // Each differs in one setting (the built-in model also in its image shape).
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--steps", "5"], &["steps: 3 in the folder, 5 now"]),
        (&["--eta", "1"], &["eta: 0.0 in the folder, 1.0 now"]),
        (
            &["--scheduler", "ddpm"],
            &["sampler: \"ddim\" in the folder, \"ddpm\" now"],
        ),
        (
            &["--timestep-spacing", "trailing"],
            &["scheduler.timestep_spacing: \"leading\" in the folder, \"trailing\" now"],
        ),
        (
            &["--dtype", "f16"],
            &["dtype: \"f32\" in the folder, \"f16\" now"],
        ),
        (&["--upscale", "2"], &["upscale: 1 in the folder, 2 now"]),
        (&["--model"], &["model_sha256: ", "image_shape: "]),
    ];
    for (extra, needles) in cases {
        let o = if extra == ["--model"] {
            // the built-in model: --model left out
            let mut c = Command::new(env!("CARGO_BIN_EXE_ddim"));
            c.args(["sample", "-q", "--steps", "3", "-n", "3", "-o"])
                .arg(&out)
                .output()
                .unwrap()
        } else {
            sample(tmp.path(), Some(&out), extra)
        };
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {e}");
        for needle in needles {
            assert!(e.contains(needle), "{extra:?}: {e}");
        }
        assert!(
            e.contains("--overwrite") && e.contains("another folder"),
            "{e}"
        );
        assert_eq!(snapshot(&out), before, "{extra:?} changed the folder");
    }
    // Two settings at once: both named.
    let o = sample(tmp.path(), Some(&out), &["--steps", "4", "--eta", "0.5"]);
    let e = stderr(&o);
    assert!(e.contains("steps: 3") && e.contains("eta: 0.0"), "{e}");
    assert_eq!(snapshot(&out), before);
}

#[test]
fn overwrite_gives_the_folder_of_a_fresh_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (reused, fresh) = (tmp.path().join("reused"), tmp.path().join("fresh"));
    // a folder with 3 images of other settings (and another seed's)
    ok(&sample(
        tmp.path(),
        Some(&reused),
        &["--steps", "2", "--eta", "1"],
    ));
    ok(&sample(
        tmp.path(),
        Some(&reused),
        &["--steps", "2", "--eta", "1", "--seed", "4"],
    ));
    std::fs::write(reused.join("notes.txt"), b"mine").unwrap();
    let new = ["-n", "2", "--steps", "4", "--timestep-spacing", "trailing"];
    ok(&sample(
        tmp.path(),
        Some(&reused),
        &[&new[..], &["--overwrite"]].concat(),
    ));
    ok(&sample(tmp.path(), Some(&fresh), &new));
    let mut got = snapshot(&reused);
    // files that are not ddim's stay
    assert_eq!(got.remove(Path::new("notes.txt")).unwrap(), b"mine");
    assert_eq!(got, snapshot(&fresh));
}

#[test]
fn the_same_settings_resume_to_the_bytes_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (grown, once) = (tmp.path().join("grown"), tmp.path().join("once"));
    ok(&sample(
        tmp.path(),
        Some(&grown),
        &["-n", "2", "--batch-size", "2"],
    ));
    // the same model from another path is the same model (its files' hash)
    let copy = tmp.path().join("model-copy");
    for sub in ["", "unet", "scheduler"] {
        std::fs::create_dir_all(copy.join(sub)).unwrap();
    }
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(tiny_model().join(f), copy.join(f)).unwrap();
    }
    let o = sample(
        tmp.path(),
        Some(&grown),
        &[
            "-n",
            "4",
            "--batch-size",
            "2",
            "--model",
            copy.to_str().unwrap(),
        ],
    );
    ok(&o);
    assert!(
        stderr(&o).contains("2 of the 4 images exist"),
        "{}",
        stderr(&o)
    );
    ok(&sample(
        tmp.path(),
        Some(&once),
        &["-n", "4", "--batch-size", "2"],
    ));
    let (mut a, mut b) = (snapshot(&grown), snapshot(&once));
    // the records differ only in the notes (where the model was read from)
    let record = |m: &mut BTreeMap<PathBuf, Vec<u8>>| -> serde_json::Value {
        serde_json::from_slice(&m.remove(Path::new("ddim-run.json")).unwrap()).unwrap()
    };
    assert_eq!(record(&mut a)["settings"], record(&mut b)["settings"]);
    assert_eq!(a, b);
}

#[test]
fn folders_from_before_the_record_are_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("old");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("sample_s0_000000.png"), b"an old image").unwrap();
    let before = snapshot(&out);
    let o = sample(tmp.path(), Some(&out), &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("no ddim-run.json") && e.contains("before ddim recorded"),
        "{e}"
    );
    assert_eq!(snapshot(&out), before);
    // a folder of other files only is used as it is
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("readme.txt"), b"x").unwrap();
    ok(&sample(tmp.path(), Some(&other), &["-n", "1"]));
    // a record that is not one is an error that says so, not a guess
    std::fs::write(other.join("ddim-run.json"), b"{\"format\": 3}").unwrap();
    let o = sample(tmp.path(), Some(&other), &["-n", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a run record"), "{}", stderr(&o));
}

#[test]
fn outputs_go_only_where_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let t = cwd.join("t.npy");
    ok(&sample(cwd, None, &["--save-tensor", t.to_str().unwrap()]));
    let g = cwd.join("g.png");
    ok(&sample(cwd, None, &["--grid", g.to_str().unwrap()]));
    assert!(t.is_file() && g.is_file());
    assert!(
        !cwd.join("samples").exists(),
        "a PNG folder nobody asked for"
    );
    // nothing else asked for: PNGs go to samples/
    ok(&sample(cwd, None, &["-n", "1"]));
    assert!(cwd.join("samples/sample_s0_000000.png").is_file());
    assert!(cwd.join("samples/ddim-run.json").is_file());
}

#[test]
fn a_scheduler_ddim_does_not_implement_is_refused_and_python_json_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir_all(model.join(sub)).unwrap();
    }
    for f in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        std::fs::copy(tiny_model().join(f), model.join(f)).unwrap();
    }
    let config = model.join("scheduler/scheduler_config.json");
    // a sampler class ddim does not implement: refused, naming it and what is implemented
    std::fs::write(
        &config,
        r#"{"_class_name": "KDPM2DiscreteScheduler", "num_train_timesteps": 1000,
            "beta_schedule": "linear"}"#,
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = sample(
        tmp.path(),
        Some(&out),
        &["--model", model.to_str().unwrap()],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("KDPM2DiscreteScheduler") && e.contains("DDIMScheduler"),
        "{e}"
    );
    assert!(!out.exists());
    // What diffusers 0.42 saves for DPMSolverMultistepScheduler (abridged), Python's -Infinity
    // included, parses and samples with that class; the record names it.
    std::fs::write(
        &config,
        r#"{"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
            "beta_schedule": "linear", "lambda_min_clipped": -Infinity, "solver_order": 2}"#,
    )
    .unwrap();
    ok(&sample(
        tmp.path(),
        Some(&out),
        &["--model", model.to_str().unwrap()],
    ));
    let record = std::fs::read_to_string(out.join("ddim-run.json")).unwrap();
    assert!(record.contains("DPMSolverMultistepScheduler"), "{record}");
    // A DDIM config with the same tokens parses and samples.
    let out = tmp.path().join("out-ddim");
    std::fs::write(
        &config,
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "linear", "some_new_key": NaN}"#,
    )
    .unwrap();
    ok(&sample(
        tmp.path(),
        Some(&out),
        &["--model", model.to_str().unwrap()],
    ));
}

/// `ddim <args> -q` run in `cwd`, where `{dir}` in `args` stands for `dir`, with `extra`'s flags
/// in place of the same flags of `args` (or added); `--model` is the tiny model unless `extra`
/// holds `--builtin` (which stands for no --model).
fn ddim_in(cwd: &Path, dir: &Path, args: &[&str], extra: &[&str]) -> Output {
    let mut all: Vec<String> = args
        .iter()
        .map(|a| a.replace("{dir}", dir.to_str().unwrap()))
        .collect();
    all.push("-q".into());
    if !extra.contains(&"--builtin") {
        all.push("--model".into());
        all.push(tiny_model().to_str().unwrap().into());
    }
    let mut rest = extra.iter();
    while let Some(&flag) = rest.next() {
        match flag {
            "--builtin" => {}
            "--overwrite" => all.push(flag.into()),
            _ => {
                let value = rest.next().expect("a value for each flag").to_string();
                match all.iter().position(|a| a == flag) {
                    Some(i) => all[i + 1] = value,
                    None => all.extend([flag.to_string(), value]),
                }
            }
        }
    }
    Command::new(env!("CARGO_BIN_EXE_ddim"))
        .current_dir(cwd)
        .args(all)
        .output()
        .expect("running ddim")
}

/// A command whose outputs are single files in `{dir}`, run with each of `cases` (extra flags
/// and what the refusal must say) after a run without: each is refused with exit 2 naming the
/// difference and touching nothing; a rerun of the first run finds nothing to do and touches
/// nothing; `--overwrite` with the case's flags leaves what a fresh run into an empty folder
/// does, byte for byte (records included).
fn file_outputs_know_their_settings(args: &[&str], cases: &[(&[&str], &[&str])]) {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let make = |name: &str, extra: &[&str]| -> PathBuf {
        let dir = cwd.join(name);
        std::fs::create_dir(&dir).unwrap();
        ok(&ddim_in(cwd, &dir, args, extra));
        dir
    };
    let dir = make("first", &[]);
    let before = snapshot(&dir);
    let records = before
        .keys()
        .filter(|p| p.to_string_lossy().ends_with(".ddim-run.json"))
        .count();
    assert!(
        records > 0 && records * 2 == before.len(),
        "{:?}",
        before.keys()
    );
    let o = ddim_in(cwd, &dir, args, &[]);
    ok(&o);
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    assert_eq!(snapshot(&dir), before);
    for (i, (extra, needles)) in cases.iter().enumerate() {
        let o = ddim_in(cwd, &dir, args, extra);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?} {extra:?}: {e}");
        for needle in *needles {
            assert!(e.contains(needle), "{args:?} {extra:?}: {e}");
        }
        assert!(
            e.contains("--overwrite") && e.contains("another file"),
            "{e}"
        );
        assert_eq!(snapshot(&dir), before, "{extra:?} changed the files");
        // --overwrite gives what a fresh run gives
        let reused = make(&format!("reused{i}"), &[]);
        ok(&ddim_in(
            cwd,
            &reused,
            args,
            &[*extra, &["--overwrite"][..]].concat(),
        ));
        let fresh = make(&format!("fresh{i}"), extra);
        assert_eq!(snapshot(&reused), snapshot(&fresh), "{extra:?}");
    }
    // A file that exists without a record is refused, not guessed about.
    let bare = make("bare", &[]);
    let record = std::fs::read_dir(&bare)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".ddim-run.json"))
        .unwrap();
    std::fs::remove_file(&record).unwrap();
    let kept = snapshot(&bare);
    let o = ddim_in(cwd, &bare, args, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("has no"), "{}", stderr(&o));
    assert_eq!(snapshot(&bare), kept);
}

/// The cases every command shares: other steps, model, scheduler config, spacing and dtype.
fn common_cases(other_scheduler: &str) -> Vec<(Vec<String>, Vec<String>)> {
    vec![
        (
            vec!["--steps".into(), "4".into()],
            vec!["steps: 3 in the file, 4 now".into()],
        ),
        (
            vec!["--builtin".into()],
            vec!["model_sha256: ".into(), "image_shape: ".into()],
        ),
        (
            vec!["--scheduler-config".into(), other_scheduler.into()],
            vec!["scheduler.beta_end: ".into()],
        ),
        (
            vec!["--timestep-spacing".into(), "trailing".into()],
            vec!["scheduler.timestep_spacing: \"leading\" in the file, \"trailing\" now".into()],
        ),
        (
            vec!["--dtype".into(), "f16".into()],
            vec!["dtype: \"f32\" in the file, \"f16\" now".into()],
        ),
    ]
}

/// Runs [`file_outputs_know_their_settings`] with the common cases and `more`.
fn check_command(args: &[&str], more: &[(&[&str], &[&str])]) {
    let tmp = tempfile::tempdir().unwrap();
    // the tiny model's scheduler with another beta_end
    let text =
        std::fs::read_to_string(tiny_model().join("scheduler/scheduler_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["beta_end"] = serde_json::json!(0.03);
    let other = tmp.path().join("other_scheduler.json");
    std::fs::write(&other, config.to_string()).unwrap();
    let common = common_cases(other.to_str().unwrap());
    let owned: Vec<(Vec<&str>, Vec<&str>)> = common
        .iter()
        .map(|(f, n)| {
            (
                f.iter().map(String::as_str).collect(),
                n.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let mut cases: Vec<(&[&str], &[&str])> = owned
        .iter()
        .map(|(f, n)| (f.as_slice(), n.as_slice()))
        .collect();
    cases.extend_from_slice(more);
    file_outputs_know_their_settings(args, &cases);
}

#[test]
fn invert_outputs_know_their_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, other) = (tmp.path().join("in.png"), tmp.path().join("other.png"));
    ok(&sample(tmp.path(), Some(&input), &["-n", "1"]));
    ok(&sample(
        tmp.path(),
        Some(&other),
        &["-n", "1", "--seed", "9"],
    ));
    let input = input.to_str().unwrap();
    let args = [
        "invert",
        "--steps",
        "3",
        "-i",
        input,
        "--save-tensor",
        "{dir}/x_T.npy",
        "--reconstruct",
        "{dir}/back.png",
    ];
    // η does not apply: inversion is deterministic (DDIM at η = 0 both ways).
    check_command(
        &args,
        &[(&["-i", other.to_str().unwrap()], &["input_sha256: "])],
    );
}

#[test]
fn interpolate_outputs_know_their_settings() {
    for output in ["{dir}/walk.gif", "{dir}/walk.png"] {
        let args = [
            "interpolate",
            "--steps",
            "3",
            "--seed-a",
            "0",
            "--seed-b",
            "1",
            "--frames",
            "3",
            "-o",
            output,
        ];
        // η does not apply: interpolation samples with DDIM at η = 0.
        check_command(
            &args,
            &[
                (&["--frames", "4"], &["frames: 3 in the file, 4 now"]),
                (&["--seed-b", "2"], &["seed_b: 1 in the file, 2 now"]),
            ],
        );
    }
}

#[test]
fn sample_files_know_their_settings() {
    let args = [
        "sample",
        "--steps",
        "3",
        "-n",
        "2",
        "--grid",
        "{dir}/grid.png",
        "--save-tensor",
        "{dir}/x0.npy",
    ];
    check_command(
        &args,
        &[
            (&["--eta", "1"], &["eta: 0.0 in the file, 1.0 now"]),
            (
                &["--scheduler", "ddpm"],
                &["sampler: \"ddim\" in the file, \"ddpm\" now"],
            ),
            (&["--seed", "3"], &["seed: 0 in the file, 3 now"]),
            (&["-n", "3"], &["num_images: 2 in the file, 3 now"]),
        ],
    );
    // -o FILE.png, one image
    check_command(
        &["sample", "--steps", "3", "-o", "{dir}/one.png"],
        &[(&["--eta", "1"], &["eta: 0.0 in the file, 1.0 now"])],
    );
}
