//! The samplers beyond DDIM and DDPM through `ddim sample`: held-out diffusers folders whose
//! scheduler config names each class (the folder chooses), and the DDPM folder converted with
//! `--scheduler NAME` (+ `--karras-sigmas`, `--scheduler-option`), each against diffusers' own
//! loop with `torch.Generator().manual_seed(seed)` (tools/fixtures/sampler_pipeline_fixtures.py).

use std::path::Path;

use crate::common::*;

fn fixtures() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ddim/tests/fixtures/pipeline/samplers.json"
    );
    ddim::json::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The tiny UNet with `config` as its scheduler config, in `dir`.
fn folder_with(dir: &Path, config: &serde_json::Value) -> std::path::PathBuf {
    let unet = Path::new(tiny_model()).join("unet");
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(unet.join(f), dir.join("unet").join(f)).unwrap();
    }
    let text = ddim::json::to_python_text(config).unwrap();
    std::fs::write(dir.join("scheduler/scheduler_config.json"), text).unwrap();
    dir.to_path_buf()
}

#[test]
fn every_sampler_reproduces_diffusers_through_the_cli() {
    let dir = tmp("samplers");
    let mut failures = Vec::new();
    let mut worst = 0f64;
    for (k, case) in fixtures()["cases"].as_array().unwrap().iter().enumerate() {
        let class = case["class"].as_str().unwrap();
        let mut args: Vec<String> = ["sample", "-q", "-n", "2", "--rng", "torch"]
            .map(String::from)
            .to_vec();
        let model = match case["mode"].as_str().unwrap() {
            "folder" => folder_with(&dir.join(format!("model-{k}")), &case["scheduler_config"]),
            _ => {
                args.extend([
                    "--scheduler".into(),
                    case["scheduler"].as_str().unwrap().into(),
                ]);
                for flag in case["flags"].as_array().unwrap() {
                    args.push(flag.as_str().unwrap().into());
                }
                Path::new(tiny_model()).to_path_buf()
            }
        };
        let npy = dir.join(format!("{k}.npy"));
        args.extend([
            "--model".into(),
            model.display().to_string(),
            "--seed".into(),
            case["seed"].to_string(),
            "--steps".into(),
            case["steps"].to_string(),
            "--save-tensor".into(),
            npy.display().to_string(),
        ]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ddim(&argv);
        if !o.status.success() {
            failures.push(format!("{class} {k}: {}", stderr(&o)));
            continue;
        }
        let got = ddim::npy::read_npy(&npy).unwrap().data;
        let want: Vec<f64> = case["final"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max)
            / scale;
        worst = worst.max(err);
        // The bar: within 2e-3 of the sample's scale.
        if err.is_nan() || err > 2e-3 {
            failures.push(format!(
                "{class} {k} ({:?}): relative error {err:.2e}",
                args
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("largest relative difference from diffusers: {worst:.2e}");
}

#[test]
fn sampler_flags_are_checked_before_anything_is_written() {
    let dir = tmp("sampler-flags");
    let out = dir.join("out");
    let o_arg = out.display().to_string();
    for (flags, says) in [
        (
            vec!["--scheduler", "dpm++9m"],
            "allowed: ddim, ddpm, dpm++2m",
        ),
        (
            vec!["--scheduler", "DDIMInverseScheduler"],
            "--scheduler DDIMInverseScheduler",
        ),
        (
            vec!["--scheduler", "ddim", "--karras-sigmas"],
            "not an option of DDIMScheduler",
        ),
        (
            vec!["--scheduler", "dpm++2m", "--eta", "0.5"],
            "η is DDIM's",
        ),
        (
            vec![
                "--scheduler",
                "dpm++2m",
                "--scheduler-option",
                "solver_order=4",
            ],
            "must be 1, 2 or 3",
        ),
        (
            vec!["--scheduler", "euler", "--scheduler-option", "solver_order"],
            "expected KEY=VALUE",
        ),
        (
            vec![
                "--scheduler",
                "euler",
                "--scheduler-option",
                "interpolation_type=cubic",
            ],
            "log_linear",
        ),
        (
            vec![
                "--scheduler",
                "dpm++2m",
                "--scheduler-option",
                "use_flow_sigmas=true",
            ],
            "use_flow_sigmas",
        ),
    ] {
        let mut args = vec!["sample", "-q", "--steps", "2", "-o", &o_arg];
        args.extend(flags.iter().copied());
        let o = ddim(&args);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{flags:?}: {}", stderr(&o));
        assert!(!out.exists(), "{flags:?} wrote {}", out.display());
    }
}
