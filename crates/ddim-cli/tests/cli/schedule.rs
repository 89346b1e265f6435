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
