//! Hub ids resolved from a local cache, offline.

use std::process::Command;

use crate::common::*;

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
