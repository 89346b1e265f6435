//! `ddim eval`: the table, CSV, plot and grids, the classifier metrics and bad input.

use crate::common::*;

/// `n` images of `size`×`size` with `channels` channels, made from a formula, in a new folder.
fn image_folder(name: &str, n: u32, size: u32, channels: u8) -> TestDir {
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
    let base = tmp("eval-out");
    let out = base.join("results");
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
}

/// `--experiment consistency`: one CSV line per sampler row and step count, each row's run of
/// the most steps at distance 0, deterministic rows the same on a rerun, a plot and a grid.
#[test]
fn eval_consistency_compares_each_run_with_its_most_steps() {
    let base = tmp("eval-consistency");
    let out = base.join("c");
    let run = |overwrite: bool| {
        let mut a = vec![
            "eval",
            "--model",
            tiny_model(),
            "--experiment",
            "consistency",
            "--sampler",
            "ddim,dpm++2m",
            "--eta",
            "0,1",
            "--steps",
            "8,2,4",
            "-n",
            "3",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ];
        if overwrite {
            a.push("--overwrite");
        }
        ddim(&a)
    };
    let o = run(false);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(stdout.contains("to the 8-step image"), "{stdout}");
    let rows = csv_rows(&out.join("consistency.csv"));
    assert_eq!(
        rows[0],
        [
            "sampler",
            "eta",
            "steps",
            "reference_steps",
            "num_samples",
            "mse_to_reference"
        ]
    );
    // ddim at two etas and dpm++2m, three step counts each
    assert_eq!(rows.len(), 1 + 3 * 3);
    for r in &rows[1..] {
        let mse: f64 = r[5].parse().unwrap();
        assert!(mse.is_finite() && mse >= 0.0, "{r:?}");
        assert_eq!(mse == 0.0, r[2] == "8", "{r:?}");
    }
    assert_eq!(
        rows[1..].iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        ["ddim", "ddim", "ddim", "ddim", "ddim", "ddim", "dpm++2m", "dpm++2m", "dpm++2m"]
    );
    for f in ["consistency.png", "consistency_grid.png", "ddim-run.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // the grid: 3 images per line, one line per row and step count (8×8 images enlarged 2×)
    let grid = image::open(out.join("consistency_grid.png")).unwrap();
    assert_eq!(grid.height(), 9 * 16 + 10 * 2);
    // a second run refuses to replace the files; with --overwrite it gives the same numbers
    let o = run(false);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let before = std::fs::read_to_string(out.join("consistency.csv")).unwrap();
    let o = run(true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("consistency.csv")).unwrap(),
        before
    );
}

/// `--experiment reconstruction`: the error of inverting and decoding an image at S steps is the
/// one `ddim invert --reconstruct` reports for it; bad input writes nothing.
#[test]
fn eval_reconstruction_matches_invert_and_refuses_bad_input() {
    let real = image_folder("eval-recon-real", 4, 8, 3);
    let base = tmp("eval-recon");
    let out = base.join("r");
    let o = ddim(&[
        "eval",
        "--model",
        tiny_model(),
        "--experiment",
        "reconstruction",
        "--data",
        real.to_str().unwrap(),
        "--steps",
        "3,6",
        "-n",
        "1",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv_rows(&out.join("reconstruction.csv"));
    assert_eq!(rows[0], ["steps", "num_images", "mse"]);
    assert_eq!(rows.len(), 3);
    let tensor = base.join("x_t.npy");
    let png = base.join("rec.png");
    let o = ddim(&[
        "invert",
        "--model",
        tiny_model(),
        "-i",
        real.join("real_000.png").to_str().unwrap(),
        "--steps",
        "6",
        "--save-tensor",
        tensor.to_str().unwrap(),
        "--reconstruct",
        png.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout).to_string();
    let mse: f64 = said
        .split("MSE ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    let ours: f64 = rows[2][2].parse().unwrap();
    assert_eq!(rows[2][0], "6");
    assert!(
        (ours - mse).abs() <= 1e-6 * mse.max(1e-6) + 1e-9,
        "eval {ours} against invert {mse}"
    );
    // bad input: exit 2, no folder
    let bad = base.join("bad");
    for (args, needle) in [
        (&["--experiment", "reconstruction"][..], "--data"),
        (
            &["--experiment", "consistency", "--steps", "0,5"][..],
            "--steps",
        ),
        (&["--experiment", "consistency", "-n", "0"][..], "-n 0"),
        (
            &["--experiment", "consistency", "--sampler", "nope"][..],
            "nope",
        ),
        (&["--experiment", "consistency", "--eta", "-1"][..], "--eta"),
        (&["--experiment", "consistency", "--resume"][..], "--resume"),
    ] {
        let mut a = vec![
            "eval",
            "--model",
            tiny_model(),
            "-q",
            "-o",
            bad.to_str().unwrap(),
        ];
        a.extend_from_slice(args);
        let o = ddim(&a);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(!bad.exists(), "{args:?} made {}", bad.display());
    }
}

/// `--experiment nfe`: each sampler at the most steps within each budget of UNet calls (Heun
/// takes 2 · steps - 1), scored, with its distance to the reference and a fitted order.
#[test]
fn eval_nfe_ladder_counts_unet_calls_per_sampler() {
    let real = image_folder("eval-nfe-real", 12, 8, 3);
    let base = tmp("eval-nfe");
    let out = base.join("n");
    let o = ddim(&[
        "eval",
        "--model",
        tiny_model(),
        "--experiment",
        "nfe",
        "--data",
        real.to_str().unwrap(),
        "--sampler",
        "ddim,heun",
        "--steps",
        "4,6",
        "--reference-steps",
        "20",
        "-n",
        "5",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(stdout.contains("fitted order p"), "{stdout}");
    let rows = csv_rows(&out.join("nfe.csv"));
    assert_eq!(&rows[0][..3], ["sampler", "nfe", "steps"]);
    let cells: Vec<(&str, &str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str()))
        .collect();
    assert_eq!(
        cells,
        [
            ("ddim", "4", "4"),
            ("ddim", "6", "6"),
            ("heun", "3", "2"),
            ("heun", "5", "3")
        ]
    );
    for r in &rows[1..] {
        let fd: f64 = r[4].parse().unwrap();
        let mse: f64 = r[9].parse().unwrap();
        assert!(fd.is_finite() && mse.is_finite() && mse > 0.0, "{r:?}");
        assert_eq!((r[10].as_str(), r[11].as_str()), ("5", "20"));
    }
    for f in ["nfe.png", "nfe_grid.png", "ddim-run.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // --reference-steps 0 is an error that writes nothing
    let bad = base.join("bad");
    let o = ddim(&[
        "eval",
        "--model",
        tiny_model(),
        "--experiment",
        "nfe",
        "--data",
        real.to_str().unwrap(),
        "--reference-steps",
        "0",
        "-q",
        "-o",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--reference-steps 0"), "{}", stderr(&o));
    assert!(!bad.exists());
}

/// `--experiment interpolation`: pairs of real images, a strip per pair, the end frames at
/// distance 0 from themselves and the frames moving from a to b.
#[test]
fn eval_interpolation_strips_between_real_images() {
    let real = image_folder("eval-interp-real", 4, 8, 3);
    let base = tmp("eval-interp");
    let out = base.join("i");
    let o = ddim(&[
        "eval",
        "--model",
        tiny_model(),
        "--experiment",
        "interpolation",
        "--data",
        real.to_str().unwrap(),
        "--steps",
        "5",
        "-n",
        "4",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv_rows(&out.join("interpolation.csv"));
    assert_eq!(rows[0], ["pair", "frame", "alpha", "mse_to_a", "mse_to_b"]);
    assert_eq!(rows.len(), 1 + 2 * 8);
    for pair in ["0", "1"] {
        let mine: Vec<&Vec<String>> = rows[1..].iter().filter(|r| r[0] == pair).collect();
        let f = |r: &Vec<String>, i: usize| r[i].parse::<f64>().unwrap();
        assert_eq!(f(mine[0], 3), 0.0);
        assert_eq!(f(mine[7], 4), 0.0);
        assert!(f(mine[7], 3) > 0.0 && f(mine[0], 4) > 0.0);
    }
    // two strips of real a, 8 frames, real b (8×8 images enlarged 2×)
    let grid = image::open(out.join("interpolation_grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (10 * 18 + 2, 2 * 18 + 2));
    let o = ddim(&[
        "eval",
        "--model",
        tiny_model(),
        "--experiment",
        "interpolation",
        "--data",
        real.to_str().unwrap(),
        "-n",
        "1",
        "-q",
        "-o",
        base.join("bad").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!base.join("bad").exists());
}
