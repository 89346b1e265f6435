//! The command-line contract: exit codes, outputs and error texts.

use std::process::{Command, Output};

fn ddim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args(args)
        .output()
        .expect("running ddim")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn schedule_prints_the_schedule_read_off_the_list() {
    let o = ddim(&[
        "schedule",
        "--steps",
        "3",
        "--timestep-spacing",
        "trailing",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ts: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["t"].as_u64().unwrap())
        .collect();
    assert_eq!(ts, [999, 666, 332]);
    assert_eq!(v[1]["next"], 332); // not 666 - 1000 // 3 = 333
}

#[test]
fn bad_values_exit_with_2_and_name_the_value() {
    let o = ddim(&["schedule", "--timestep-spacing", "bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("bogus") && e.contains("trailing"), "{e}");

    let o = ddim(&["schedule", "--steps", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("num_inference_steps"), "{}", stderr(&o));

    let o = ddim(&["schedule", "--steps", "100000"]);
    assert_eq!(o.status.code(), Some(2));

    let o = ddim(&["schedule", "--eta", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("eta"), "{}", stderr(&o));

    let o = ddim(&["schedule", "--config", "/definitely/not/here.json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not/here.json"), "{}", stderr(&o));

    let o = ddim(&["schedule", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("panicked"));
}

// --- sample / invert / interpolate on the tiny diffusers folder of the library's fixtures ---

fn tiny_model() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ddim/tests/fixtures/pipeline/tiny-ddpm"
    )
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ddim-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The sorted names of everything in `dir`, hidden files included.
/// The files in `dir`, less the run record that every output folder holds.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "ddim-run.json")
        .collect();
    names.sort();
    names
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The tiny model as `DDIMPipeline.save_pretrained` wrote it: its model_index.json and DDIM
/// scheduler config from the fixtures, and the (byte-identical) unet of the DDPMPipeline folder.
fn tiny_ddim_pipeline(dir: &std::path::Path) -> std::path::PathBuf {
    let fx = std::path::Path::new(tiny_model()).parent().unwrap();
    let out = dir.join("tiny-ddim-pipeline");
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir_all(out.join(sub)).unwrap();
    }
    let src = fx.join("tiny-ddim-pipeline");
    std::fs::copy(src.join("model_index.json"), out.join("model_index.json")).unwrap();
    std::fs::copy(
        src.join("scheduler/scheduler_config.json"),
        out.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(
            std::path::Path::new(tiny_model()).join("unet").join(f),
            out.join("unet").join(f),
        )
        .unwrap();
    }
    out
}

#[test]
fn sample_with_torch_rng_reproduces_diffusers_through_the_cli() {
    // Every sampling case of the pipeline fixtures (DDIM eta 0/0.5/1, epsilon/v/sample prediction,
    // leading/trailing/linspace, DDPM 20 and 100 steps), through `ddim sample`, on the folder saved
    // by DDPMPipeline and on the one saved by DDIMPipeline.
    let dir = tmp("torch");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ddim/tests/fixtures/pipeline/expected.json"
    );
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ddim_folder = tiny_ddim_pipeline(&dir);
    let mut worst = 0f32;
    for model in [
        tiny_model().to_string(),
        ddim_folder.to_str().unwrap().to_string(),
    ] {
        for (k, c) in fx["cases"].as_array().unwrap().iter().enumerate() {
            let name = c["name"].as_str().unwrap();
            let expected: Vec<f32> = c["final"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let cfg = dir.join(format!("{k}-scheduler_config.json"));
            std::fs::write(&cfg, c["scheduler_config"].to_string()).unwrap();
            let x = dir.join(format!("{k}.npy"));
            let out = dir.join(format!("{k}-images"));
            let (steps, eta, seed) = (
                c["steps"].to_string(),
                c["eta"].to_string(),
                c["seed"].to_string(),
            );
            let o = ddim(&[
                "sample",
                "--model",
                &model,
                "-n",
                "2",
                "--rng",
                "torch",
                "--seed",
                &seed,
                "--quiet",
                "--scheduler",
                c["sampler"].as_str().unwrap(),
                "--steps",
                &steps,
                "--eta",
                &eta,
                "--scheduler-config",
                cfg.to_str().unwrap(),
                "--save-tensor",
                x.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--overwrite",
            ]);
            assert!(o.status.success(), "{name}: {}", stderr(&o));
            let got = ddim::npy::read_npy(&x).unwrap();
            assert_eq!(got.shape, vec![2, 3, 8, 8]);
            let d = max_diff(&got.data, &expected);
            assert!(d < 1e-3, "{name} on {model}: max |Δ| = {d}");
            worst = worst.max(d);
            assert!(out.join("sample_00001.png").exists());
        }
    }
    eprintln!("largest difference from diffusers through the CLI: {worst:e}");

    // Inversion through `ddim invert`, against DDIMInverseScheduler's loop.
    let inv = &fx["inversion"];
    let x0: Vec<f32> = inv["x0"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let x0_path = dir.join("x0.npy");
    ddim::npy::write_npy(&x0_path, &[1, 3, 8, 8], &x0).unwrap();
    let cfg = dir.join("inverse-config.json");
    std::fs::write(
        &cfg,
        r#"{"_class_name": "DDPMScheduler", "clip_sample": false, "variance_type": "fixed_large"}"#,
    )
    .unwrap();
    let xt = dir.join("xt.npy");
    let o = ddim(&[
        "invert",
        "--model",
        tiny_model(),
        "--input",
        x0_path.to_str().unwrap(),
        "--steps",
        "10",
        "-q",
        "--scheduler-config",
        cfg.to_str().unwrap(),
        "--save-tensor",
        xt.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected: Vec<f32> = inv["x_t"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let d = max_diff(&ddim::npy::read_npy(&xt).unwrap().data, &expected);
    assert!(d < 1e-3, "inversion through the CLI: max |Δ| = {d}");
}

#[test]
fn sample_numbers_after_existing_files_and_respects_noise_files() {
    let dir = tmp("numbering");
    let out = dir.join("imgs");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--model",
            tiny_model(),
            "--steps",
            "3",
            "-q",
            "--output",
        ];
        let o = out.to_str().unwrap().to_string();
        args.push(&o);
        args.extend_from_slice(extra);
        let r = ddim(&args);
        assert!(r.status.success(), "{}", stderr(&r));
    };
    // --rng torch cannot resume per image: it numbers after the files already there.
    run(&["-n", "2", "--rng", "torch"]);
    run(&["-n", "1", "--rng", "torch"]);
    assert_eq!(
        names(&out),
        ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
    );

    // The default generator: image 1 of a run is the same alone or in a batch (--noise round trip).
    let a = dir.join("a.npy");
    let b = dir.join("b.npy");
    let r = ddim(&[
        "sample",
        "--model",
        tiny_model(),
        "--steps",
        "3",
        "-q",
        "-n",
        "3",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--output",
        dir.join("o1").to_str().unwrap(),
        "--save-tensor",
        a.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = ddim(&[
        "sample",
        "--model",
        tiny_model(),
        "--steps",
        "3",
        "-q",
        "-n",
        "3",
        "--batch-size",
        "3",
        "--seed",
        "5",
        "--output",
        dir.join("o2").to_str().unwrap(),
        "--save-tensor",
        b.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    // The noise is bit-identical; the UNet's float sums may differ in the last bits between batch
    // shapes (gemm blocking), so compare with a tolerance.
    let d = max_diff(
        &ddim::npy::read_npy(&a).unwrap().data,
        &ddim::npy::read_npy(&b).unwrap().data,
    );
    assert!(d < 1e-4, "batch 2+1 vs batch 3: max |Δ| = {d}");
    // An existing tensor file is not overwritten without --overwrite.
    let r = ddim(&[
        "sample",
        "--model",
        tiny_model(),
        "--steps",
        "3",
        "-q",
        "--output",
        dir.join("o3").to_str().unwrap(),
        "--save-tensor",
        a.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("--overwrite"), "{}", stderr(&r));
}

#[test]
fn sample_rejects_bad_input_with_exit_code_2() {
    let dir = tmp("bad");
    let m = tiny_model();
    let out = dir.join("o");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["sample", "--model", m, "--steps", "0", "--output", o],
            "num_inference_steps",
        ),
        (
            vec!["sample", "--model", m, "--steps", "100000", "--output", o],
            "100000",
        ),
        (
            vec!["sample", "--model", m, "--eta", "-1", "--output", o],
            "eta",
        ),
        (
            vec!["sample", "--model", m, "-n", "0", "--output", o],
            "-n 0",
        ),
        (
            vec!["sample", "--model", "/no/such/model", "--output", o],
            "/no/such/model",
        ),
        (
            vec![
                "sample",
                "--model",
                m,
                "--timestep-spacing",
                "sideways",
                "--output",
                o,
            ],
            "sideways",
        ),
        (
            vec![
                "sample",
                "--model",
                m,
                "--rng",
                "torch",
                "-n",
                "4",
                "--batch-size",
                "2",
                "--output",
                o,
            ],
            "one batch",
        ),
    ] {
        let r = ddim(&args);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {}", stderr(&r));
        let e = stderr(&r);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
    // A --noise file of the wrong shape, and one with a NaN.
    let wrong = dir.join("wrong.npy");
    ddim::npy::write_npy(&wrong, &[1, 3, 4, 4], &[0.0; 48]).unwrap();
    let r = ddim(&[
        "sample",
        "--model",
        m,
        "--noise",
        wrong.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("does not match"), "{}", stderr(&r));
    let nan = dir.join("nan.npy");
    let mut v = vec![0.0f32; 192];
    v[7] = f32::NAN;
    ddim::npy::write_npy(&nan, &[1, 3, 8, 8], &v).unwrap();
    let r = ddim(&[
        "sample",
        "--model",
        m,
        "--noise",
        nan.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("not finite"), "{}", stderr(&r));
}

#[test]
fn invert_then_reconstruct_and_interpolate() {
    let dir = tmp("invert");
    let m = tiny_model();
    // A sample to invert: write one image, then invert it.
    let img = dir.join("x.png");
    let r = ddim(&[
        "sample",
        "--model",
        m,
        "--steps",
        "5",
        "-q",
        "--output",
        img.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let xt = dir.join("xt.npy");
    let rec = dir.join("rec.png");
    let r = ddim(&[
        "invert",
        "--model",
        m,
        "--input",
        img.to_str().unwrap(),
        "--steps",
        "20",
        "-q",
        "--save-tensor",
        xt.to_str().unwrap(),
        "--reconstruct",
        rec.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("PSNR"), "{out}");
    assert_eq!(ddim::npy::read_npy(&xt).unwrap().shape, vec![1, 3, 8, 8]);
    assert!(rec.exists());

    let gif = dir.join("walk.gif");
    let r = ddim(&[
        "interpolate",
        "--model",
        m,
        "--seed-a",
        "1",
        "--seed-b",
        "2",
        "--frames",
        "4",
        "--steps",
        "3",
        "-q",
        "--output",
        gif.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(gif.exists());
    let r = ddim(&[
        "interpolate",
        "--model",
        m,
        "--seed-a",
        "1",
        "--seed-b",
        "2",
        "--frames",
        "1",
        "--output",
        dir.join("g.png").to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn hub_ids_resolve_from_a_local_cache_offline() {
    let dir = tmp("hub");
    let cache = dir.join("hub-cache");
    // Not cached: exit code 2 and how to fix it; nothing is fetched.
    let r = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args(["sample", "--model", "google/ddpm-cifar10-32", "-q"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("google/ddpm-cifar10-32"),
        "{}",
        stderr(&r)
    );
    // A cache laid out like huggingface_hub's, holding the tiny pipeline folder.
    let repo = cache.join("models--tiny--ddpm");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir_all(snap.join(sub)).unwrap();
        for entry in std::fs::read_dir(std::path::Path::new(tiny_model()).join(sub)).unwrap() {
            let e = entry.unwrap();
            std::fs::copy(e.path(), snap.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        std::path::Path::new(tiny_model()).join("model_index.json"),
        snap.join("model_index.json"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    let out = dir.join("o");
    let r = Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args([
            "sample",
            "--model",
            "tiny/ddpm",
            "--steps",
            "2",
            "-q",
            "--output",
        ])
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(out.join("sample_s0_000000.png").exists());
}

#[test]
fn schedule_converts_and_writes_scheduler_configs() {
    // A DDPM config (google/ddpm-cifar10-32) written back as a DDIMScheduler config, the way
    // DDIMScheduler.from_config + save_config would (checked to load in diffusers 0.42.1).
    let dir = tmp("save-config");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ddim/tests/fixtures/hub-configs/google--ddpm-cifar10-32/scheduler_config.json"
    );
    let out = dir.join("scheduler_config.json");
    let o = ddim(&[
        "schedule",
        "--config",
        src,
        "--save-config",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let loaded = ddim::scheduler::SchedulerConfig::from_file(&out).unwrap();
    assert!(loaded.unknown_keys.is_empty(), "{:?}", loaded.unknown_keys);
    assert_eq!(loaded.config.class_name.as_deref(), Some("DDIMScheduler"));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains("variance_type") && text.contains("set_alpha_to_one"));
    // Not overwritten without --overwrite.
    let o = ddim(&[
        "schedule",
        "--config",
        src,
        "--save-config",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

// --- long runs: seed-indexed names, resume, exact counts, shards ---

/// `ddim sample` on the tiny model with `args`, as a command not yet run.
fn sample_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddim"));
    c.args(["sample", "--model", tiny_model(), "-q"]).args(args);
    c
}

/// `sample_s{seed}_{i:06}.png` for i in `range`.
fn seeded_names(seed: u64, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| format!("sample_s{seed}_{i:06}.png"))
        .collect()
}

/// Asserts that `a` and `b` hold the same files, byte for byte.
fn assert_same_files(a: &std::path::Path, b: &std::path::Path) {
    assert_eq!(names(a), names(b));
    for name in names(a) {
        assert!(
            std::fs::read(a.join(&name)).unwrap() == std::fs::read(b.join(&name)).unwrap(),
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn count_pngs(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".png"))
            })
            .count()
    })
}

/// Starts `cmd` and waits until `ready()` holds, the child has exited, or `secs` have passed;
/// returns the running (or finished) child.
fn spawn_until(
    cmd: &mut Command,
    stderr: std::process::Stdio,
    secs: u64,
    ready: impl Fn() -> bool,
) -> std::process::Child {
    let mut child = cmd.stderr(stderr).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ready() && child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child
}

/// Sends SIGINT (what Ctrl-C sends) to `child` and collects its output.
#[cfg(unix)]
fn interrupt(child: std::process::Child) -> Output {
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    child.wait_with_output().unwrap()
}

#[test]
fn sample_resumes_after_a_kill_with_the_same_files() {
    let dir = tmp("resume");
    let (reference, run) = (dir.join("reference"), dir.join("run"));
    let cmd = |out: &std::path::Path| {
        let mut c = sample_cmd(&["-n", "40", "--batch-size", "4", "--steps", "20", "-o"]);
        c.arg(out);
        c
    };
    let r = cmd(&reference).output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(names(&reference), seeded_names(0, 0..40));

    // Kill a run once it has written some images (SIGKILL: no cleanup runs). Whether the kill
    // lands mid-run is a matter of timing; the checks below hold either way.
    let mut child = spawn_until(&mut cmd(&run), std::process::Stdio::null(), 120, || {
        count_pngs(&run) > 0
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let done = count_pngs(&run);
    eprintln!("killed with {done} of 40 images written");

    let r = cmd(&run).output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    if done > 0 && done < 40 {
        let e = stderr(&r);
        assert!(e.contains(&format!("{done} of the 40 images exist")), "{e}");
    }
    // Exactly the 40 images, no temporary file left, each identical to the uninterrupted run's.
    assert_same_files(&run, &reference);

    // --overwrite samples everything again, to the same bytes.
    let r = cmd(&run).arg("--overwrite").output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(!stderr(&r).contains("exist"), "{}", stderr(&r));
    assert_same_files(&run, &reference);
}

#[test]
fn sample_writes_exactly_n_seed_indexed_images() {
    let dir = tmp("exact");
    let out = dir.join("o");
    let o = out.to_str().unwrap();
    // 7 images in batches of 3: 3 + 3 + 1.
    let r = sample_cmd(&["-n", "7", "--batch-size", "3", "--steps", "3", "-o", o])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(names(&out), seeded_names(0, 0..7));
    // Another seed adds its own names; the same command again has nothing to do.
    let r = sample_cmd(&["-n", "2", "--seed", "12", "--steps", "3", "-o", o])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    let r = sample_cmd(&["-n", "7", "--batch-size", "3", "--steps", "3", "-o", o])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stderr(&r).contains("all 7 images exist"), "{}", stderr(&r));
    let mut expected = seeded_names(0, 0..7);
    expected.extend(seeded_names(12, 0..2));
    assert_eq!(names(&out), expected);
}

#[test]
fn sample_shards_together_give_the_single_run() {
    let dir = tmp("shards");
    let (single, sharded) = (dir.join("single"), dir.join("sharded"));
    // n = 20 is not a multiple of 3 shards nor of the batch of 16; eta > 0 draws noise every
    // step. The UNet's float sums depend on the batch's shape, and over 20 steps of this random
    // model that changes most PNGs: a shard must sample the single run's batches, not its own.
    let common = [
        "-n",
        "20",
        "--batch-size",
        "16",
        "--steps",
        "20",
        "--eta",
        "0.5",
    ];
    let r = sample_cmd(&common)
        .args(["-o", single.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    // The three shards at once into one folder, as a job array would run them.
    let children: Vec<_> = (0..3)
        .map(|k| {
            sample_cmd(&common)
                .args([
                    "-o",
                    sharded.to_str().unwrap(),
                    "--shard",
                    &format!("{k}/3"),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ranges = [
        "images 0 .. 5 of",
        "images 6 .. 12 of",
        "images 13 .. 19 of",
    ];
    for (child, range) in children.into_iter().zip(ranges) {
        let r = child.wait_with_output().unwrap();
        assert!(r.status.success(), "{}", stderr(&r));
        assert!(stderr(&r).contains(range), "{}", stderr(&r));
    }
    assert_eq!(names(&sharded), seeded_names(0, 0..20));
    assert_same_files(&sharded, &single);
}

#[test]
fn sample_rejects_bad_shards_with_exit_code_2() {
    let dir = tmp("bad-shards");
    let o = dir.join("o");
    let o = o.to_str().unwrap();
    for bad in ["3/3", "a/b", "1/0", "0/0", "2", "-1/2", "1/2/3"] {
        let r = sample_cmd(&["-o", o, &format!("--shard={bad}")])
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(2), "{bad}: {}", stderr(&r));
        let e = stderr(&r);
        assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
        assert!(
            e.contains("0 <= K < N") || e.contains("0/3 .. 2/3"),
            "{bad}: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
    }
    let grid = dir.join("g.png");
    let x = dir.join("x.npy");
    let png = dir.join("x.png");
    for (extra, needle) in [
        (vec!["--rng", "torch"], "--rng torch"),
        (vec!["--noise", x.to_str().unwrap()], "--noise"),
        (vec!["--grid", grid.to_str().unwrap()], "--grid"),
        (vec!["--save-tensor", x.to_str().unwrap()], "--save-tensor"),
    ] {
        let r = sample_cmd(&["-n", "4", "-o", o, "--shard", "1/2"])
            .args(&extra)
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(2), "{extra:?}: {}", stderr(&r));
        let e = stderr(&r);
        assert!(e.contains("--shard 1/2") && e.contains(needle), "{e}");
    }
    let r = sample_cmd(&["-o", png.to_str().unwrap(), "--shard", "0/2"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("names one file"), "{}", stderr(&r));
    // --save-tensor needs every image's values: not on a resume that would skip some.
    let r = sample_cmd(&["-n", "2", "--steps", "2", "-o", o])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    let r = sample_cmd(&["-n", "3", "--steps", "2", "-o", o, "--save-tensor"])
        .arg(&x)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("2 of them exist"), "{}", stderr(&r));
    // Nothing was written by the refused runs.
    assert_eq!(names(&dir.join("o")), seeded_names(0, 0..2));
}

#[cfg(unix)]
#[test]
fn sample_exits_with_130_on_ctrl_c() {
    let dir = tmp("ctrl-c");
    let out = dir.join("o");
    let child = spawn_until(
        sample_cmd(&["-n", "400", "--batch-size", "4", "--steps", "20", "-o"]).arg(&out),
        std::process::Stdio::piped(),
        120,
        || count_pngs(&out) > 0,
    );
    let r = interrupt(child);
    if r.status.code() != Some(0) {
        // (0 only if the run finished before the signal came.)
        assert_eq!(r.status.code(), Some(130), "{}", stderr(&r));
        assert!(
            stderr(&r).contains("run the same command again"),
            "{}",
            stderr(&r)
        );
    }
}

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
    let _ = std::fs::remove_dir_all(&dir);
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
    let _ = std::fs::remove_dir_all(&dir);
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
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ddim sample -n 2 --steps 4` of the built-in model with `extra` flags, into `dir/name/`;
/// returns its samples as `--save-tensor` wrote them (`dir/name.npy`).
fn sample_builtin(dir: &std::path::Path, name: &str, extra: &[&str]) -> ddim::npy::NpyArray {
    let (out, npy) = (dir.join(name), dir.join(format!("{name}.npy")));
    let mut args = vec!["sample", "-n", "2", "--steps", "4", "-q"];
    args.extend(["-o", out.to_str().unwrap()]);
    args.extend(["--save-tensor", npy.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let o = ddim(&args);
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    ddim::npy::read_npy(&npy).unwrap()
}

#[test]
fn sample_without_model_uses_the_built_in_mnist_model() {
    let dir = tmp("builtin");
    let x0 = sample_builtin(&dir, "o", &[]);
    assert_eq!(x0.shape, [2, 1, 28, 28]);
    let img =
        ddim::image_io::load_image(&dir.join("o").join("sample_s0_000000.png"), 1, None).unwrap();
    assert_eq!(img.dims(), &[1, 1, 28, 28]);
    let o = ddim(&["inspect"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("built-in MNIST model"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// PSNR in [0, 1] image space of each image of `b` against `a` (samples in [-1, 1]).
fn psnrs(a: &[f32], b: &[f32], images: usize) -> Vec<f64> {
    let per = a.len() / images;
    a.chunks(per)
        .zip(b.chunks(per))
        .map(|(a, b)| {
            let mse = a
                .iter()
                .zip(b)
                .map(|(x, y)| ((x.clamp(-1.0, 1.0) - y.clamp(-1.0, 1.0)) as f64 / 2.0).powi(2))
                .sum::<f64>()
                / per as f64;
            -10.0 * mse.log10()
        })
        .collect()
}

/// `--dtype f16` runs the UNet in f16 (the scheduler in f32): its samples stay within 35 dB
/// PSNR of f32's (41-59 dB per image at 20 steps). `--dtype bf16` on the CPU runs the
/// convolutions' products in bf16 where the CPU has AVX512-BF16 (samples within 30 dB of
/// f32's; 39-64 dB measured at 20 steps, 16 images), and is refused by name elsewhere.
#[test]
fn sample_in_f16_stays_close_to_f32_and_bf16_on_the_cpu_needs_avx512_bf16() {
    let dir = tmp("dtype");
    let run = |dtype: &str| sample_builtin(&dir, dtype, &["--dtype", dtype]);
    let (full, half) = (run("f32"), run("f16"));
    assert_eq!(full.shape, half.shape);
    for psnr in psnrs(&full.data, &half.data, 2) {
        assert!(psnr > 35.0, "f16 against f32: PSNR {psnr:.1} dB");
    }
    #[cfg(target_arch = "x86_64")]
    let bf16_here = std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let bf16_here = false;
    if bf16_here {
        let bf16 = run("bf16");
        assert_eq!(full.shape, bf16.shape);
        assert!(full.data != bf16.data, "--dtype bf16 changed nothing");
        for psnr in psnrs(&full.data, &bf16.data, 2) {
            assert!(psnr > 30.0, "bf16 against f32: PSNR {psnr:.1} dB");
        }
    } else {
        let o = ddim(&[
            "sample",
            "-n",
            "1",
            "--dtype",
            "bf16",
            "-q",
            "-o",
            dir.join("bf16").to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2));
        let err = stderr(&o);
        assert!(
            err.contains("--dtype bf16") && err.contains("AVX512-BF16"),
            "{err}"
        );
        assert!(
            !dir.join("bf16").exists(),
            "nothing written for a refused run"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// --- eval ---

/// `n` images of `size`×`size` with `channels` channels, made from a formula, in a new folder.
fn image_folder(name: &str, n: u32, size: u32, channels: u8) -> std::path::PathBuf {
    let dir = tmp(name);
    for i in 0..n {
        let v = |x: u32, y: u32, c: u32| ((x * 37 + y * 11 + i * 53 + c * 91) % 256) as u8;
        let img = if channels == 1 {
            image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(size, size, |x, y| {
                image::Luma([v(x, y, 0)])
            }))
        } else {
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(size, size, |x, y| {
                image::Rgb([v(x, y, 0), v(x, y, 1), v(x, y, 2)])
            }))
        };
        img.save(dir.join(format!("real_{i:03}.png"))).unwrap();
    }
    dir
}

fn csv_rows(path: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn eval_on_a_folder_prints_the_table_and_writes_csv_plot_and_grids() {
    let real = image_folder("eval-real", 12, 8, 3);
    let out = tmp("eval-out").join("results");
    let run = || {
        ddim(&[
            "eval",
            "--model",
            tiny_model(),
            "--data",
            real.to_str().unwrap(),
            "--steps",
            "4,2",
            "--eta",
            "0,1",
            "--num-samples",
            "8",
            "--batch-size",
            "3",
            "--output",
            out.to_str().unwrap(),
            "--quiet",
        ])
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        stderr(&o).contains("only the pixel-space FD"),
        "{}",
        stderr(&o)
    );
    // one table (pixel FD only): title, header with the step counts ascending, a row per eta
    let lines: Vec<&str> = text.lines().collect();
    let title = lines
        .iter()
        .position(|l| l.starts_with("FD in pixel space"))
        .unwrap_or_else(|| panic!("{text}"));
    let header: Vec<&str> = lines[title + 1].split_whitespace().collect();
    assert_eq!(header, ["eta", "\\", "steps", "2", "4"], "{text}");
    for (row, eta) in [(title + 2, "0"), (title + 3, "1")] {
        let cells: Vec<&str> = lines[row].split_whitespace().collect();
        assert_eq!(cells.len(), 3, "{text}");
        assert_eq!(cells[0], eta);
        for v in &cells[1..] {
            let fd: f64 = v.parse().unwrap();
            assert!(fd.is_finite() && fd >= 0.0, "{text}");
        }
    }
    assert!(!text.contains("precision"), "{text}");

    let rows = csv_rows(&out.join("metrics.csv"));
    assert_eq!(rows[0][..4], ["eta", "steps", "num_samples", "fd_pixels"]);
    assert_eq!(rows.len(), 5, "a header and four cells");
    let cells: Vec<(String, String)> = rows[1..]
        .iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let expect = [("0", "2"), ("0", "4"), ("1", "2"), ("1", "4")];
    assert_eq!(
        cells,
        expect.map(|(a, b)| (a.to_string(), b.to_string())),
        "rows in (eta, steps) order"
    );
    for r in &rows[1..] {
        assert_eq!(r.len(), rows[0].len());
        assert_eq!(r[2], "8");
        assert!(r[3].parse::<f64>().unwrap() >= 0.0);
        let fd_classifier = rows[0].iter().position(|c| c == "fd_classifier").unwrap();
        assert_eq!(r[fd_classifier], "", "no classifier for a folder");
    }
    let png = image::open(out.join("metrics.png")).unwrap();
    assert!(png.width() >= 300 && png.height() >= 200);
    let grid = image::open(out.join("samples_eta1_steps4.png")).unwrap();
    assert!(grid.width() > 16);

    // the same command again refuses to replace the results; --overwrite replaces them and the
    // deterministic eta = 0 cells give the same numbers
    let o = run();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    let o = ddim(&[
        "eval",
        "--model",
        tiny_model(),
        "--data",
        real.to_str().unwrap(),
        "--steps",
        "2",
        "--eta",
        "0",
        "-n",
        "8",
        "--batch-size",
        "5",
        "-o",
        out.to_str().unwrap(),
        "-q",
        "--overwrite",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = csv_rows(&out.join("metrics.csv"));
    assert_eq!(again.len(), 2);
    let (a, b): (f64, f64) = (again[1][3].parse().unwrap(), rows[1][3].parse().unwrap());
    assert!(
        (a - b).abs() < 1e-3 * b.max(1.0),
        "{a} vs {b}: another batch size, same noise"
    );
}

/// A model of the digits' shape (a tiny UNet trained for two steps) gets the classifier's
/// metrics: feature FD, precision, recall and the predicted classes.
#[test]
fn eval_on_a_builtin_set_reports_the_classifier_metrics() {
    let dir = tmp("eval-digits");
    let model = dir.join("model");
    let o = ddim(&[
        "train",
        "--data",
        "digits",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--output",
        model.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("eval");
    let o = ddim(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "digits",
        "--steps",
        "2",
        "--eta",
        "0.5",
        "-n",
        "10",
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for title in [
        "FD in pixel space",
        "FD in classifier features",
        "precision",
        "recall",
        "entropy of predicted classes",
        "share of the most common predicted class",
    ] {
        assert!(text.contains(title), "{title}: {text}");
    }
    assert!(
        stderr(&o).contains("accurate on the held-out real images"),
        "{}",
        stderr(&o)
    );
    let rows = csv_rows(&out.join("metrics.csv"));
    assert_eq!(rows.len(), 2);
    let col = |name: &str| rows[0].iter().position(|c| c == name).unwrap();
    let v = |name: &str| rows[1][col(name)].parse::<f64>().unwrap();
    assert!(v("fd_classifier") > 0.0);
    for name in ["precision", "recall", "top_class_share"] {
        assert!((0.0..=1.0).contains(&v(name)), "{name}");
    }
    assert!((0.0..=10f64.log2() + 1e-9).contains(&v("class_entropy_bits")));
    assert!(out.join("metrics.png").is_file());

    // --resume keeps the finished cell as it is and samples only the new one.
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "digits",
            "--eta",
            "0.5",
            "-o",
            out.to_str().unwrap(),
            "-q",
        ];
        args.extend(extra);
        ddim(&args)
    };
    let o = eval(&["--steps", "2,3", "-n", "10"]);
    assert_eq!(o.status.code(), Some(2), "refused without --resume");
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    let o = eval(&["--steps", "2,3", "-n", "10", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sampled: Vec<String> = stderr(&o)
        .lines()
        .filter(|l| l.starts_with("eta "))
        .map(String::from)
        .collect();
    assert_eq!(sampled.len(), 1, "{sampled:?}");
    assert!(sampled[0].contains("steps 3 "), "{sampled:?}");
    let resumed = csv_rows(&out.join("metrics.csv"));
    assert_eq!(resumed.len(), 3);
    assert_eq!(resumed[1], rows[1], "the finished cell is kept as it was");
    assert_eq!(resumed[2][col("steps")], "3");
    let text = String::from_utf8_lossy(&o.stdout);
    let header = text
        .lines()
        .find(|l| l.starts_with("eta \\ steps"))
        .unwrap();
    assert!(
        header.ends_with("  2         3"),
        "both cells in the table: {text}"
    );
    // Cells of other settings are not mixed in.
    let o = eval(&["--steps", "5", "-n", "11", "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("num_samples: 10 in the folder, 11 now"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        csv_rows(&out.join("metrics.csv")),
        resumed,
        "nothing changed"
    );
}

#[test]
fn eval_rejects_bad_input_with_exit_code_2() {
    let real = image_folder("eval-bad-real", 4, 8, 3);
    let real = real.to_str().unwrap();
    let out = tmp("eval-bad-out");
    let out = out.to_str().unwrap();
    let check = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["eval", "-o", out, "-q"];
        if !extra.contains(&"-n") {
            args.extend(["-n", "4"]);
        }
        if !extra.contains(&"--model") {
            args.extend(["--model", tiny_model()]);
        }
        if !extra.contains(&"--data") {
            args.extend(["--data", real]);
        }
        args.extend(extra);
        let o = ddim(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(!e.contains("panicked"), "{e}");
        for n in needles {
            assert!(e.contains(n), "{extra:?}: `{n}` not in {e}");
        }
    };
    check(&["--steps", "10,0"], &["--steps 0", "at least 1"]);
    check(&["--steps", "5000"], &["--steps 5000", "1000"]);
    check(&["--eta", "0,-0.5"], &["--eta -0.5", ">= 0"]);
    check(&["--eta", "nan"], &["--eta NaN", ">= 0"]);
    check(&["--eta", "inf"], &["--eta inf", "finite"]);
    check(&["-n", "0"], &["--num-samples 0", "at least"]);
    check(&["-n", "3"], &["--num-samples 3", "k + 1"]);
    check(&["--batch-size", "0"], &["--batch-size 0"]);
    check(
        &["--data", "no-such-set"],
        &["no-such-set", "digits, mnist5k"],
    );
    // the built-in sets are 1×8×8 and 1×28×28; the tiny model makes 3×8×8 images
    check(&["--data", "digits"], &["1×8×8", "3×8×8"]);
    check(&["--data", "mnist5k"], &["1×28×28", "3×8×8"]);
    let gray = image_folder("eval-bad-gray", 3, 8, 1);
    check(&["--data", gray.to_str().unwrap()], &["grayscale", "RGB"]);
    let big = image_folder("eval-bad-big", 3, 16, 3);
    check(&["--data", big.to_str().unwrap()], &["16×16", "8×8"]);
    check(&["--model", "/definitely/not/a/model"], &["not/a/model"]);
    let _ = std::fs::remove_dir_all(&gray);
    let _ = std::fs::remove_dir_all(&big);
}

// --- bad model files, bad tensors, unwritable outputs (issue: reliability) ---

/// A copy of the tiny pipeline folder with `edit` applied to its `unet/` folder.
fn broken_model(name: &str, edit: impl FnOnce(&std::path::Path)) -> std::path::PathBuf {
    let dir = tmp(name);
    let src = std::path::Path::new(tiny_model());
    for sub in ["", "unet", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    edit(&dir.join("unet"));
    dir
}

fn edit_config(unet: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = unet.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Replaces the unet's weights with a PyTorch zip archive holding `pickle` as its data.pkl.
fn write_pth(unet: &std::path::Path, pickle: &[u8]) {
    use std::io::Write;
    std::fs::remove_file(unet.join(WEIGHTS)).unwrap();
    let file = std::fs::File::create(unet.join("diffusion_pytorch_model.bin")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// Runs `ddim inspect` on the model and checks exit code 2, no panic, and every needle.
fn assert_refused(model: &std::path::Path, needles: &[&str]) {
    let o = ddim(&["inspect", "--model", model.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}: {e}", model.display());
    assert!(!e.contains("panicked"), "{e}");
    for needle in needles {
        assert!(
            e.contains(needle),
            "{}: no `{needle}` in: {e}",
            model.display()
        );
    }
    let _ = std::fs::remove_dir_all(model);
}

#[test]
fn broken_configs_are_refused_with_exit_code_2() {
    assert_refused(&tmp("bad-empty"), &["no UNet config found"]);
    let m = broken_model("bad-no-config", |u| {
        std::fs::remove_file(u.join("config.json")).unwrap()
    });
    assert_refused(&m, &["no UNet config found", "config.json"]);
    let m = broken_model("bad-json", |u| {
        let text = std::fs::read_to_string(u.join("config.json")).unwrap();
        std::fs::write(u.join("config.json"), &text[..text.len() / 2]).unwrap();
    });
    assert_refused(&m, &["unet/config.json", "EOF"]);
    let m = broken_model("bad-block", |u| {
        edit_config(u, |v| v["down_block_types"][0] = "FancyDownBlock2D".into())
    });
    assert_refused(&m, &["down_block_types", "FancyDownBlock2D", "DownBlock2D"]);
    let m = broken_model("bad-act", |u| {
        edit_config(u, |v| v["act_fn"] = "swishy".into())
    });
    assert_refused(&m, &["act_fn", "swishy", "silu"]);
    let m = broken_model("bad-layers", |u| {
        edit_config(u, |v| v["layers_per_block"] = 3.into())
    });
    assert_refused(&m, &["missing tensor", "down_blocks.0.resnets.2"]);
    let m = broken_model("bad-channels", |u| {
        edit_config(u, |v| v["out_channels"] = 4.into())
    });
    assert_refused(&m, &["conv_out.weight", "[4, ", "[3, "]);
}

#[test]
fn broken_safetensors_are_refused_without_huge_allocations() {
    let m = broken_model("bad-trunc", |u| {
        let bytes = std::fs::read(u.join(WEIGHTS)).unwrap();
        std::fs::write(u.join(WEIGHTS), &bytes[..bytes.len() / 2]).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "not a usable weights file"]);
    // a header length of 2^62 bytes, and a tensor of 10^10 floats in a 16-byte file
    let m = broken_model("bad-header", |u| {
        let mut bytes = (1u64 << 62).to_le_bytes().to_vec();
        bytes.extend(b"{}");
        std::fs::write(u.join(WEIGHTS), bytes).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "header too large"]);
    let m = broken_model("bad-offsets", |u| {
        let header = br#"{"conv_in.weight":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend([0u8; 16]);
        std::fs::write(u.join(WEIGHTS), bytes).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "not a usable weights file"]);
    let m = broken_model("bad-not-json", |u| {
        let mut bytes = 9u64.to_le_bytes().to_vec();
        bytes.extend(b"{not json");
        std::fs::write(u.join(WEIGHTS), bytes).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "not a usable weights file"]);
}

#[test]
fn pickles_holding_code_or_bombs_are_refused_and_nothing_runs() {
    let dir = tmp("pickle-marker");
    let marker = dir.join("executed");
    let command = format!("touch {}", marker.display());
    // os.system("touch <marker>")
    let mut p = b"\x80\x02cposix\nsystem\nX".to_vec();
    p.extend((command.len() as u32).to_le_bytes());
    p.extend(command.as_bytes());
    p.extend(b"\x85R.");
    let m = broken_model("bad-pickle-code", |u| write_pth(u, &p));
    assert_refused(
        &m,
        &[
            "diffusion_pytorch_model.bin",
            "posix.system",
            "nothing was executed",
        ],
    );
    // a state dict whose only value is that call
    let mut p2 = b"\x80\x02}X\x0e\x00\x00\x00conv_in.weightcbuiltins\nexec\nX".to_vec();
    p2.extend((command.len() as u32).to_le_bytes());
    p2.extend(command.as_bytes());
    p2.extend(b"\x85Rs.");
    let m = broken_model("bad-pickle-dict", |u| write_pth(u, &p2));
    assert_refused(&m, &["builtins.exec"]);
    assert!(!marker.exists(), "the pickle's code ran");
    // a list copied into itself 64 times: 2^64 objects if built
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..64 {
        bomb.extend(b"h\x00h\x00\x86q\x00");
    }
    bomb.push(b'.');
    let m = broken_model("bad-pickle-bomb", |u| write_pth(u, &bomb));
    assert_refused(&m, &["objects"]);
    let m = broken_model("bad-pickle-zip", |u| {
        std::fs::remove_file(u.join(WEIGHTS)).unwrap();
        std::fs::write(
            u.join("diffusion_pytorch_model.bin"),
            b"PK\x03\x04 truncated",
        )
        .unwrap();
    });
    assert_refused(&m, &["diffusion_pytorch_model.bin", "zip"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_finite_weights_warn_and_float64_noise_converts_when_exact() {
    let m = broken_model("nan-weights", |u| {
        let path = u.join(WEIGHTS);
        let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        let bias = tensors.get("conv_out.bias").unwrap();
        let mut v = bias
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[1] = f32::INFINITY;
        tensors.insert(
            "conv_out.bias".into(),
            candle_core::Tensor::new(v, &candle_core::Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    let o = ddim(&["inspect", "--model", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning") && e.contains("conv_out.bias") && e.contains("NaN or infinite"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&m);

    // --noise as float64: exact values are taken, a value float32 cannot hold is an error
    let dir = tmp("noise-f64");
    let out = dir.join("o");
    let f64_npy = |name: &str, values: &[f64]| {
        let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 3, 8, 8), }";
        let mut header = format!("{dict:<117}\n").into_bytes();
        header.truncate(118);
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header);
        for v in values {
            bytes.extend(v.to_le_bytes());
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let exact: Vec<f64> = (0..192).map(|i| (i as f64 - 96.0) / 64.0).collect();
    let good = f64_npy("exact.npy", &exact);
    let mut inexact = exact.clone();
    inexact[5] = 0.1;
    let bad = f64_npy("inexact.npy", &inexact);
    let run = |noise: &std::path::Path| {
        ddim(&[
            "sample",
            "--model",
            tiny_model(),
            "--noise",
            noise.to_str().unwrap(),
            "--steps",
            "2",
            "--quiet",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let o = run(&good);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&bad);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("inexact.npy") && e.contains("flat index 5") && e.contains("float32"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn unwritable_outputs_and_a_full_disk_keep_what_was_there() {
    let dir = tmp("unwritable");
    let m = tiny_model();
    // an output folder under a regular file
    let file = dir.join("a-file");
    std::fs::write(&file, b"keep me").unwrap();
    let under = file.join("out");
    let sample_into = |out: &std::path::Path| {
        ddim(&[
            "sample",
            "--model",
            m,
            "--steps",
            "2",
            "--quiet",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let o = sample_into(&under);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("a-file"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // a folder without write permission (root may write anyway: then there is nothing to test)
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(locked.join("probe"), b"").is_err() {
        let o = sample_into(&locked);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("locked"), "{}", stderr(&o));
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A full disk while writing: the file size limit (ulimit -f, 512-byte blocks, with SIGXFSZ
    // ignored so writes fail with EFBIG as they would with ENOSPC) stops the --save-tensor
    // write; the previous file stays as it was and no temporary file is left.
    let tensor = dir.join("x0.npy");
    std::fs::write(&tensor, b"the previous tensor").unwrap();
    let script = format!(
        "trap '' XFSZ; ulimit -f 1; cd {}; exec \"$0\" sample --model {m} --steps 2 -n 2 \
         --quiet --overwrite --save-tensor {}",
        dir.display(),
        tensor.display()
    );
    let o = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_ddim")])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("x0.npy") && !e.contains("panicked"), "{e}");
    assert_eq!(std::fs::read(&tensor).unwrap(), b"the previous tensor");
    // (--save-tensor alone writes no PNG folder)
    assert_eq!(names(&dir), ["a-file", "locked", "x0.npy"]);
    let _ = std::fs::remove_dir_all(&dir);
}
