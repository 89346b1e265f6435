//! `scheduler_config.json` by serde: diffusers' keys, per-class defaults, legacy files, the
//! non-finite tokens, round trips of the public configs, and errors that name the key.

use ddim::scheduler::{SchedulerConfig, SchedulerKind, TimestepSpacing, VarianceType};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn read_json(path: &str) -> Value {
    ddim::json::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Equal as diffusers would read them: numbers by value (1000 and 1000.0 alike).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => match (ddim::json::as_f64(a), ddim::json::as_f64(b)) {
            (Some(p), Some(q)) => p == q || (p.is_nan() && q.is_nan()),
            _ => a == b,
        },
    }
}

#[test]
fn every_class_has_diffusers_keys_and_defaults() {
    let defaults = read_json(&format!("{FIXTURES}/samplers/class_defaults.json"));
    for &kind in SchedulerKind::ALL {
        let expected = defaults[kind.class_name()].as_object().unwrap();
        let mut keys: Vec<&str> = kind.keys().to_vec();
        keys.sort_unstable();
        let want: Vec<&str> = expected.keys().map(String::as_str).collect(); // sorted
        assert_eq!(keys, want, "{kind:?}: diffusers' keys");
        let ours = kind.defaults().to_json(kind);
        for (key, want) in expected {
            assert!(
                same(&ours[key], want),
                "{kind:?} {key}: {} vs {want}",
                ours[key]
            );
        }
        // A file holding only `_class_name` reads as the class's defaults.
        let text = format!(r#"{{"_class_name": "{}"}}"#, kind.class_name());
        let loaded = SchedulerConfig::from_json_str(&text).unwrap();
        assert_eq!(loaded.config, kind.defaults());
    }
}

#[test]
fn public_configs_round_trip() {
    let dir = format!("{FIXTURES}/hub-configs");
    let mut files: Vec<String> = vec![format!("{dir}/legacy-gaussian-ddpm-scheduler_config.json")];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("scheduler_config.json");
        if path.exists() {
            files.push(path.display().to_string());
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let original = read_json(&file);
        let loaded = SchedulerConfig::from_file(&file).unwrap();
        assert!(
            loaded.unknown_keys.is_empty(),
            "{file}: {:?}",
            loaded.unknown_keys
        );
        let kind = loaded.config.kind().unwrap();
        let written = loaded.config.to_json(kind);
        // Every key the file gives keeps its value (the legacy `timesteps` is T).
        for (key, v) in original.as_object().unwrap() {
            let key = if key == "timesteps" {
                "num_train_timesteps"
            } else {
                key
            };
            if key.starts_with('_') || key == "timestep_values" {
                continue;
            }
            assert!(
                same(&written[key], v),
                "{file} {key}: {v} -> {}",
                written[key]
            );
        }
        // Written as diffusers writes it and read again: the same config.
        let text = ddim::json::to_python_text(&written).unwrap();
        let again = SchedulerConfig::from_json_str(&text).unwrap();
        assert!(again.unknown_keys.is_empty());
        let expected_class = SchedulerConfig {
            class_name: Some(kind.class_name().into()),
            ..loaded.config.clone()
        };
        assert_eq!(again.config, expected_class, "{file}");
    }
}

#[test]
fn conversion_carries_the_source_class_keys() {
    // google/ddpm-cifar10-32 is a DDPMScheduler config; DDIMScheduler.from_config(its config)
    // keeps its keys and takes DDIM's defaults for the others.
    let ddpm = SchedulerConfig::from_file(format!(
        "{FIXTURES}/hub-configs/google--ddpm-cifar10-32/scheduler_config.json"
    ))
    .unwrap()
    .config;
    assert_eq!(ddpm.variance_type, Some(VarianceType::FixedLarge));
    let ddim = ddpm.converted_to(SchedulerKind::Ddim).unwrap();
    assert_eq!(ddim.kind(), Some(SchedulerKind::Ddim));
    assert!(ddim.set_alpha_to_one);
    assert_eq!(ddim.timestep_spacing, ddpm.timestep_spacing);
    assert_eq!(ddim.clip_sample, ddpm.clip_sample);
    // Back again: DDPM's own key (variance_type) is DDPM's default, as DDIM has none.
    let back = ddim.converted_to(SchedulerKind::Ddpm).unwrap();
    assert_eq!(back.variance_type, Some(VarianceType::FixedSmall));
}

#[test]
fn bad_values_name_the_key_and_what_is_allowed() {
    let cases = [
        (r#"{"beta_start": "x"}"#, "beta_start", "a number"),
        (
            r#"{"num_train_timesteps": -3}"#,
            "num_train_timesteps",
            "non-negative integer",
        ),
        (
            r#"{"num_train_timesteps": 0}"#,
            "num_train_timesteps",
            "1 to",
        ),
        (
            r#"{"prediction_type": "eps"}"#,
            "prediction_type",
            "v_prediction",
        ),
        (r#"{"timestep_spacing": 3}"#, "timestep_spacing", "string"),
        (r#"{"clip_sample": "yes"}"#, "clip_sample", "boolean"),
        (
            r#"{"trained_betas": [0.1, "a"]}"#,
            "trained_betas",
            "a number",
        ),
        (
            r#"{"clip_sample_range": -Infinity}"#,
            "clip_sample_range",
            "positive",
        ),
        (r#"[1, 2]"#, "scheduler_config", "JSON object"),
    ];
    for (text, key, allowed) in cases {
        let e = SchedulerConfig::from_json_str(text)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(allowed), "{text}: {e}");
    }
    // Integral floats, nulls where diffusers writes them, and legacy keys are read.
    let loaded = SchedulerConfig::from_json_str(
        r#"{"num_train_timesteps": 1000.0, "variance_type": null, "timestep_spacing": "trailing",
            "tensor_format": "pt", "made_up": 1}"#,
    )
    .unwrap();
    assert_eq!(loaded.config.num_train_timesteps, 1000);
    assert_eq!(loaded.config.timestep_spacing, TimestepSpacing::Trailing);
    assert_eq!(loaded.unknown_keys, vec!["made_up".to_string()]);
}
