//! The loader: folder layouts (pipeline, bare unet, flat), and clear errors when the config and
//! the weights disagree. Uses the tiny models of `tests/fixtures/unet/`.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ddim::loader::{find_unet_files, load_unet, WeightFiles};
use ddim::{Error, WeightProblem};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

fn hub_scheduler_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hub-configs/google--ddpm-cifar10-32/scheduler_config.json")
}

/// A scratch folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ddim-unet-loader-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies the files of fixture `name` (not `io.safetensors`) into `to`.
fn copy_model(name: &str, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap();
        if file != "io.safetensors" {
            fs::copy(&path, to.join(file)).unwrap();
        }
    }
}

/// Rewrites `key` of the `config.json` in `dir`.
fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value;
    fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> Error {
    load_unet(dir, DType::F32, &Device::Cpu).expect_err("loading should fail")
}

#[test]
fn pipeline_folder_and_its_unet_subfolder() {
    let tmp = TempDir::new("pipeline");
    let root = &tmp.0;
    fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "DDPMPipeline"}"#,
    )
    .unwrap();
    copy_model("fourier_no_mid", &root.join("unet"));
    fs::create_dir_all(root.join("scheduler")).unwrap();
    fs::copy(
        hub_scheduler_config(),
        root.join("scheduler/scheduler_config.json"),
    )
    .unwrap();

    let files = find_unet_files(root).unwrap();
    assert_eq!(files.config, root.join("unet/config.json"));
    assert_eq!(
        files.weights,
        WeightFiles::Safetensors(root.join("unet/diffusion_pytorch_model.safetensors"))
    );
    assert_eq!(
        files.scheduler_config,
        Some(root.join("scheduler/scheduler_config.json"))
    );

    // Pointing at `unet/` directly still finds the pipeline's scheduler.
    let unet = load_unet(&root.join("unet"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        unet.scheduler_config(),
        Some(root.join("scheduler/scheduler_config.json").as_path())
    );
}

#[test]
fn flat_folder_like_google_ddpm() {
    let tmp = TempDir::new("flat");
    copy_model("legacy_single_head", &tmp.0);
    fs::copy(hub_scheduler_config(), tmp.0.join("scheduler_config.json")).unwrap();
    let unet = load_unet(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        unet.files.weights,
        WeightFiles::PyTorch(tmp.0.join("diffusion_pytorch_model.bin"))
    );
    assert_eq!(
        unet.scheduler_config(),
        Some(tmp.0.join("scheduler_config.json").as_path())
    );
}

#[test]
fn fixture_folders_have_no_scheduler() {
    let files = find_unet_files(&fixture("multi_head_sharded")).unwrap();
    assert!(
        matches!(files.weights, WeightFiles::ShardedSafetensors { ref shards, .. } if shards.len() == 3)
    );
    assert_eq!(files.scheduler_config, None);
}

#[test]
fn unknown_config_keys_are_returned() {
    let tmp = TempDir::new("unknown-keys");
    copy_model("misc", &tmp.0);
    set_config(&tmp.0, "some_future_key", serde_json::json!(true));
    let unet = load_unet(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        unet.unknown_config_keys,
        vec!["some_future_key".to_string()]
    );
}

#[test]
fn folder_without_weights() {
    let tmp = TempDir::new("no-weights");
    fs::copy(
        fixture("misc").join("config.json"),
        tmp.0.join("config.json"),
    )
    .unwrap();
    let err = load_err(&tmp.0);
    let msg = err.to_string();
    assert!(matches!(err, Error::ModelFileNotFound { .. }), "{msg}");
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains(".bin"),
        "{msg}"
    );
    let err = load_err(&tmp.0.join("does-not-exist"));
    assert!(matches!(err, Error::ModelFileNotFound { .. }), "{err}");
}

#[test]
fn missing_tensors_are_named_with_their_shape() {
    let tmp = TempDir::new("missing");
    copy_model("fourier_no_mid", &tmp.0);
    set_config(&tmp.0, "layers_per_block", serde_json::json!(2));
    let err = load_err(&tmp.0);
    let msg = err.to_string();
    let Error::WeightMismatch { problems, .. } = &err else {
        panic!("{msg}")
    };
    assert!(problems.contains(&WeightProblem::Missing {
        name: "down_blocks.0.resnets.1.conv1.weight".into(),
        expected: vec![4, 4, 3, 3],
    }));
    assert!(
        msg.contains("missing tensor `down_blocks.0.resnets.1.conv1.weight`"),
        "{msg}"
    );
}

#[test]
fn wrong_shapes_name_both_shapes() {
    let tmp = TempDir::new("shape");
    copy_model("scale_shift_class", &tmp.0);
    set_config(&tmp.0, "time_embedding_dim", serde_json::json!(32));
    let err = load_err(&tmp.0);
    let msg = err.to_string();
    let Error::WeightMismatch { problems, .. } = &err else {
        panic!("{msg}")
    };
    assert!(problems.contains(&WeightProblem::WrongShape {
        name: "time_embedding.linear_1.weight".into(),
        expected: vec![32, 4],
        found: vec![16, 4],
    }));
    assert!(msg.contains("[16, 4]") && msg.contains("[32, 4]"), "{msg}");
}

#[test]
fn unexpected_tensors_are_reported() {
    let tmp = TempDir::new("unexpected");
    copy_model("scale_shift_class", &tmp.0);
    set_config(&tmp.0, "num_class_embeds", serde_json::Value::Null);
    let err = load_err(&tmp.0);
    let Error::WeightMismatch { problems, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        problems,
        &vec![WeightProblem::Unexpected {
            name: "class_embedding.weight".into(),
            shape: vec![10, 16],
        }]
    );
}

#[test]
fn shard_names_must_stay_in_the_folder() {
    let tmp = TempDir::new("shard-escape");
    fs::copy(
        fixture("misc").join("config.json"),
        tmp.0.join("config.json"),
    )
    .unwrap();
    fs::write(
        tmp.0.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"conv_in.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let err = load_err(&tmp.0);
    assert!(
        matches!(err, Error::InvalidConfig { ref key, .. } if key == "weight_map"),
        "{err}"
    );
}

#[test]
fn unreadable_bin_names_the_file() {
    let tmp = TempDir::new("bad-bin");
    fs::copy(
        fixture("misc").join("config.json"),
        tmp.0.join("config.json"),
    )
    .unwrap();
    fs::write(
        tmp.0.join("diffusion_pytorch_model.bin"),
        b"not a zip archive",
    )
    .unwrap();
    let msg = load_err(&tmp.0).to_string();
    assert!(msg.contains("diffusion_pytorch_model.bin"), "{msg}");
}

/// bf16 on the CPU and integer dtypes are refused by name before any weight is read; f16 loads.
#[test]
fn dtypes_that_cannot_run_are_refused_at_load() {
    let dir = fixture("misc");
    for (dtype, says) in [(DType::BF16, "CUDA or Metal"), (DType::U8, "a float dtype")] {
        match load_unet(&dir, dtype, &Device::Cpu).expect_err("should be refused") {
            Error::InvalidArgument {
                name,
                value,
                allowed,
            } => {
                assert_eq!((name.as_str(), value.as_str()), ("dtype", dtype.as_str()));
                assert!(allowed.contains(says), "{allowed}");
            }
            other => panic!("{dtype:?}: unexpected error {other}"),
        }
    }
    let unet = load_unet(&dir, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(unet.model.dtype(), DType::F16);
}
