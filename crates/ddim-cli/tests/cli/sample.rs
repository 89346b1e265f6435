//! `ddim sample`: diffusers parity through the command line, numbering, bad input, seed-indexed
//! names, resume after a kill, exact counts, shards, Ctrl-C, the built-in model and dtypes.

use std::process::Command;

use crate::common::*;

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
}

/// `sample --init IMAGE --strength S` (SDEdit): the images start from the init image, the
/// record keeps its bytes and the strength, and what cannot run is refused before any output.
#[test]
fn sample_from_an_init_image_with_a_strength() {
    let dir = tmp("sdedit");
    let init = dir.join("init.png");
    image::RgbImage::from_fn(8, 8, |x, y| {
        let v = ((x * 29 + y * 13) % 256) as u8;
        image::Rgb([v, v / 2, 255 - v])
    })
    .save(&init)
    .unwrap();
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--model",
            tiny_model(),
            "--init",
            init.to_str().unwrap(),
            "--steps",
            "10",
            "-n",
            "2",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        ddim(&a)
    };
    // a small strength keeps the image: one step from t = 0
    let o = run(&["--strength", "0.1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = image::open(&init).unwrap().to_rgb8();
    for i in 0..2 {
        let got = image::open(out.join(format!("sample_s0_{i:06}.png")))
            .unwrap()
            .to_rgb8();
        let worst = got
            .pixels()
            .zip(want.pixels())
            .flat_map(|(a, b)| (0..3).map(move |c| (a[c] as i32 - b[c] as i32).abs()))
            .max()
            .unwrap();
        assert!(worst <= 16, "image {i} moved {worst} levels");
    }
    let record = std::fs::read_to_string(out.join("ddim-run.json")).unwrap();
    assert!(
        record.contains("init_sha256") && record.contains("strength"),
        "{record}"
    );
    // another strength is another run: refused in the same folder
    let o = run(&["--strength", "0.5"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("strength"), "{}", stderr(&o));
    for (extra, needle) in [
        (&["--strength", "0"][..], "--strength 0"),
        (&["--strength", "1.5"][..], "--strength 1.5"),
        (&["--strength", "0.05"][..], "no step to run"),
        (
            &["--scheduler", "euler", "--strength", "0.5"][..],
            "ddim or ddpm",
        ),
        (&["--noise", "x.npy"][..], "--noise"),
    ] {
        let fresh = dir.join("never");
        let mut a = vec![
            "sample",
            "--model",
            tiny_model(),
            "--init",
            init.to_str().unwrap(),
            "--steps",
            "10",
            "-q",
            "-o",
            fresh.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = ddim(&a);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{extra:?}: {}", stderr(&o));
        assert!(!fresh.exists(), "{extra:?}");
    }
    let o = ddim(&["sample", "--model", tiny_model(), "--strength", "0.5", "-q"]);
    assert_eq!(o.status.code(), Some(2), "--strength without --init");
}
