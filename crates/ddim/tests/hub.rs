//! `ddim::hub::resolve_model_with` on fake Hugging Face caches laid out like huggingface_hub's
//! (`models--owner--name/{refs/<revision>, snapshots/<commit>/...}`). No test reaches the network:
//! each builds explicit `HubOptions` on its own temp folder, offline, or with an endpoint on a
//! closed local port.

use std::path::{Path, PathBuf};

use ddim::hub::{resolve_model_with, HubOptions};
use ddim::Error;

const COMMIT: &str = "267b167dc01f0e4e61923ea244e8b988f84deb80";
const OTHER_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Writes a snapshot of `repo` (`owner/name`) at `commit` holding `files`, and points `refs/<rev>`
/// at it for each of `refs`. Returns the snapshot folder.
fn fake_snapshot(cache: &Path, repo: &str, commit: &str, refs: &[&str], files: &[&str]) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    for file in files {
        let path = snapshot.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{}").unwrap();
    }
    for rev in refs {
        let ref_path = repo_dir.join("refs").join(rev);
        std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
        std::fs::write(&ref_path, commit).unwrap();
    }
    snapshot
}

const FLAT: &[&str] = &[
    "model_index.json",
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "scheduler_config.json",
];

const PIPELINE: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "scheduler/scheduler_config.json",
];

#[test]
fn offline_finds_a_flat_repo_in_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = fake_snapshot(
        cache.path(),
        "google/ddpm-cifar10-32",
        COMMIT,
        &["main"],
        FLAT,
    );
    let options = HubOptions::offline(cache.path());
    assert_eq!(
        resolve_model_with("google/ddpm-cifar10-32", &options).unwrap(),
        snapshot
    );
    // The loader finds the UNet in what the resolver returns.
    let files = ddim::loader::find_unet_files(&snapshot).unwrap();
    assert_eq!(files.config, snapshot.join("config.json"));
}

#[test]
fn offline_finds_a_pipeline_repo_in_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = fake_snapshot(cache.path(), "o/pipe", COMMIT, &["main"], PIPELINE);
    let resolved = resolve_model_with("o/pipe", &HubOptions::offline(cache.path())).unwrap();
    assert_eq!(resolved, snapshot);
    let files = ddim::loader::find_unet_files(&resolved).unwrap();
    assert_eq!(
        files.scheduler_config,
        Some(snapshot.join("scheduler/scheduler_config.json"))
    );
}

#[test]
fn offline_follows_revisions_and_commits() {
    let cache = tempfile::tempdir().unwrap();
    let main = fake_snapshot(cache.path(), "o/m", COMMIT, &["main"], FLAT);
    let tagged = fake_snapshot(
        cache.path(),
        "o/m",
        OTHER_COMMIT,
        &["v1", "refs/pr/2"],
        FLAT,
    );
    let options = HubOptions::offline(cache.path());
    assert_eq!(resolve_model_with("o/m", &options).unwrap(), main);
    assert_eq!(resolve_model_with("o/m@main", &options).unwrap(), main);
    assert_eq!(resolve_model_with("o/m@v1", &options).unwrap(), tagged);
    assert_eq!(
        resolve_model_with("o/m@refs/pr/2", &options).unwrap(),
        tagged
    );
    // A full commit hash names its snapshot folder, with no ref needed.
    assert_eq!(
        resolve_model_with(&format!("o/m@{COMMIT}"), &options).unwrap(),
        main
    );
    let err = resolve_model_with("o/m@v2", &options).unwrap_err();
    assert!(matches!(err, Error::HubNotCached { .. }), "{err}");
    assert!(err.to_string().contains("revision `v2`"), "{err}");
}

#[test]
fn offline_miss_says_where_it_looked_and_how_to_fix() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model_with("google/ddpm-cifar10-32", &HubOptions::offline(cache.path()))
        .unwrap_err();
    let Error::HubNotCached {
        repo_id, cache_dir, ..
    } = &err
    else {
        panic!("expected HubNotCached, got {err}");
    };
    assert_eq!(repo_id, "google/ddpm-cifar10-32");
    assert_eq!(cache_dir, cache.path());
    let message = err.to_string();
    for needle in [
        "google/ddpm-cifar10-32",
        &cache.path().display().to_string(),
        "HF_HUB_OFFLINE",
        "huggingface-cli download google/ddpm-cifar10-32",
    ] {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
    // Looking did not create anything.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn offline_refuses_an_incomplete_snapshot() {
    let cache = tempfile::tempdir().unwrap();
    fake_snapshot(cache.path(), "o/half", COMMIT, &["main"], &["config.json"]);
    let err = resolve_model_with("o/half", &HubOptions::offline(cache.path())).unwrap_err();
    assert!(matches!(err, Error::HubNotCached { .. }), "{err}");
    assert!(err.to_string().contains("incomplete"), "{err}");
}

#[test]
fn offline_never_follows_a_ref_out_of_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    // A snapshot-like folder outside `snapshots/`, and a ref that tries to reach it.
    fake_snapshot(cache.path(), "o/evil", COMMIT, &[], FLAT);
    let refs = cache.path().join("models--o--evil/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(
        refs.join("main"),
        format!("../../models--o--evil/snapshots/{COMMIT}"),
    )
    .unwrap();
    let err = resolve_model_with("o/evil", &HubOptions::offline(cache.path())).unwrap_err();
    assert!(err.to_string().contains("commit hash"), "{err}");
}

#[test]
fn an_existing_folder_wins_over_a_hub_id() {
    let cache = tempfile::tempdir().unwrap();
    let options = HubOptions::offline(cache.path());
    // Tests run in the crate folder, where `tests/fixtures` is both a folder and hub-id shaped.
    assert_eq!(
        resolve_model_with("tests/fixtures", &options).unwrap(),
        Path::new("tests/fixtures")
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().to_str().unwrap();
    assert_eq!(resolve_model_with(spec, &options).unwrap(), dir.path());
}

#[test]
fn refuses_what_is_neither_a_folder_nor_a_hub_id() {
    let cache = tempfile::tempdir().unwrap();
    let options = HubOptions::offline(cache.path());
    for spec in [
        "",
        "../x",
        "a/b/c",
        "no-slash",
        "a/b@../../etc",
        "a--b/c",
        "/definitely/not/here",
    ] {
        let err = resolve_model_with(spec, &options).unwrap_err();
        assert!(
            matches!(err, Error::ModelNotFound { .. }),
            "{spec:?}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with("model folder or hub id not found"),
            "{message}"
        );
        assert!(message.contains("owner/name@revision"), "{message}");
    }
    // A file is not a model folder.
    let file = cache.path().join("model.safetensors");
    std::fs::write(&file, b"").unwrap();
    let err = resolve_model_with(file.to_str().unwrap(), &options).unwrap_err();
    assert!(err.to_string().contains("is a file"), "{err}");
    // Nothing but that file was written to the cache.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
}

/// Online options whose endpoint is a closed local port: requests fail at once, off the network.
fn unreachable(cache: &Path) -> HubOptions {
    HubOptions {
        offline: false,
        endpoint: "http://127.0.0.1:9".to_string(),
        ..HubOptions::offline(cache)
    }
}

#[test]
fn request_errors_name_the_repo_and_suggest_offline_when_cached() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model_with("o/missing", &unreachable(cache.path())).unwrap_err();
    assert!(matches!(err, Error::HubRequest { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("`o/missing`"), "{message}");
    assert!(message.contains("HF_TOKEN"), "{message}");

    let snapshot = fake_snapshot(cache.path(), "o/cached", COMMIT, &["main"], FLAT);
    let err = resolve_model_with("o/cached", &unreachable(cache.path())).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("in the cache at {}", snapshot.display())),
        "{message}"
    );
    assert!(message.contains("HF_HUB_OFFLINE=1"), "{message}");
}
