//! `ddim schedule`: the schedule read off the timestep list, configs converted and written.

use crate::common::*;

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

#[test]
fn schedule_prints_any_samplers_timesteps_and_sigmas() {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ddim/tests/fixtures/hub-configs/google--ddpm-cifar10-32/scheduler_config.json"
    );
    // The DDPM config converted to Euler keeps its "leading" spacing, as from_config does.
    let o = ddim(&[
        "schedule",
        "--config",
        src,
        "--scheduler",
        "euler",
        "--steps",
        "5",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["scheduler"], "EulerDiscreteScheduler");
    let ts: Vec<f64> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["t"].as_f64().unwrap())
        .collect();
    assert_eq!(ts, [800.0, 600.0, 400.0, 200.0, 0.0]);
    let sigmas: Vec<f64> = v["sigmas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert_eq!(sigmas.len(), 6);
    assert_eq!(sigmas[5], 0.0);
    assert!(sigmas.windows(2).all(|w| w[0] > w[1]), "{sigmas:?}");
    // "leading": x_T is scaled by sqrt(σ_max² + 1).
    let init = v["init_noise_sigma"].as_f64().unwrap();
    assert!((init - (sigmas[0] * sigmas[0] + 1.0).sqrt()).abs() < 1e-3 * init);

    // Heun calls the model twice per step but the last.
    let o = ddim(&["schedule", "--scheduler", "heun", "--steps", "4", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["steps"].as_array().unwrap().len(), 7);

    // Options are checked and saved under the class.
    let dir = tmp("schedule-sampler");
    let out = dir.join("scheduler_config.json");
    let o = ddim(&[
        "schedule",
        "--scheduler",
        "dpm++3m",
        "--karras-sigmas",
        "--save-config",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = ddim::scheduler::SchedulerConfig::from_file(&out)
        .unwrap()
        .config;
    assert_eq!(
        saved.class_name.as_deref(),
        Some("DPMSolverMultistepScheduler")
    );
    assert!(saved.use_karras_sigmas);
    assert_eq!(saved.solver_order, 3);
    for bad in [
        vec!["--scheduler", "dpm++9m"],
        vec!["--scheduler", "euler", "--scheduler-option", "solver_order"],
        vec![
            "--scheduler",
            "unipc",
            "--scheduler-option",
            "solver_order=\"x\"",
        ],
    ] {
        let o = ddim(&[&["schedule", "--steps", "3"][..], &bad[..]].concat());
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }
}
