//! `--model` arguments -> local model folders: an existing folder as is, or a Hugging Face hub id
//! (`owner/name[@revision]`) fetched into (or, offline, found in) the standard Hugging Face cache,
//! following huggingface_hub's `snapshot_download` cache layout and `HF_HUB_OFFLINE` semantics
//! (huggingface_hub `file_download.py`, `constants.py`, `utils/_validators.py`).

use std::fmt;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::loader::{
    find_unet_files, CONFIG_NAME, MODEL_INDEX_NAME, PYTORCH_NAME, SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME, SCHEDULER_CONFIG_NAME,
};
use crate::{Error, Result};

/// The hub's default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when a hub id has no `@revision`.
pub const DEFAULT_REVISION: &str = "main";

/// Where and how hub ids are resolved: the cache folder, offline mode and the network settings.
///
/// [`HubOptions::from_env`] reads them like huggingface_hub does; tests and embedders can build
/// one explicitly instead of touching process-global environment variables.
///
/// ```
/// use ddim::hub::HubOptions;
///
/// let options = HubOptions::offline("/tmp/hf-cache");
/// assert!(options.offline);
/// assert_eq!(options.cache_dir, std::path::Path::new("/tmp/hf-cache"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder, holding `models--owner--name/{refs,snapshots,blobs}`.
    pub cache_dir: PathBuf,
    /// Never touch the network; only the cache is used.
    pub offline: bool,
    /// The hub's address, e.g. [`DEFAULT_ENDPOINT`] or a mirror.
    pub endpoint: String,
    /// An access token for private or gated repos.
    pub token: Option<String>,
    /// Show download progress bars on stderr.
    pub progress: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: say whether there is one, never what it is.
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// Options from the environment, as huggingface_hub reads it:
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
    ///   `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
    /// - offline: `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case);
    /// - endpoint: `HF_ENDPOINT`, else [`DEFAULT_ENDPOINT`];
    /// - token: `HF_TOKEN`, else the file `$HF_HOME/token` (written by `huggingface-cli login`).
    ///
    /// Progress bars are off; a command-line tool turns them on.
    ///
    /// ```
    /// let options = ddim::hub::HubOptions::from_env();
    /// assert!(!options.progress);
    /// ```
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok(), dirs::home_dir())
    }

    /// Offline options on `cache_dir`: no network, the default endpoint, no token, no progress.
    ///
    /// ```
    /// let options = ddim::hub::HubOptions::offline("/tmp/hf-cache");
    /// assert!(options.offline && options.token.is_none());
    /// ```
    pub fn offline(cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            cache_dir: cache_dir.into(),
            offline: true,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            progress: false,
        }
    }

    /// [`HubOptions::from_env`] over a variable lookup and a home folder, so it can be tested
    /// without touching the process environment.
    fn from_vars(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        // huggingface_hub: HF_HOME = $HF_HOME or $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface.
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))
                // No home folder at all: a relative path, which error messages will show.
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = var("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        HubOptions {
            cache_dir,
            offline,
            endpoint,
            token,
            progress: false,
        }
    }
}

/// huggingface_hub's `_is_true`: `1`, `true`, `yes`, `on` in any case.
fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Resolves a `--model` argument to a local model folder, with [`HubOptions::from_env`].
///
/// See [`resolve_model_with`].
///
/// ```
/// let dir = std::env::temp_dir();
/// let resolved = ddim::hub::resolve_model(dir.to_str().unwrap())?;
/// assert_eq!(resolved, dir);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_with(spec, &HubOptions::from_env())
}

/// Resolves a `--model` argument to a local model folder:
/// 1. an existing folder is returned as is;
/// 2. a hub id `owner/name` or `owner/name@revision` (branch, tag or commit) is resolved to its
///    snapshot folder in the Hugging Face cache (`<cache>/models--owner--name/snapshots/<commit>`),
///    downloading only what a diffusers UNet pipeline needs: `model_index.json` if present, the
///    UNet config and weights (`unet/` or top-level; safetensors, else `.bin`) and the scheduler
///    config. Offline, the snapshot the revision points to is used if it holds a UNet.
///
/// Anything else is an [`Error::ModelNotFound`]. Offline with nothing cached is an
/// [`Error::HubNotCached`]; a failed request is an [`Error::HubRequest`].
///
/// ```
/// use ddim::hub::{resolve_model_with, HubOptions};
///
/// // A fake cache, laid out like huggingface_hub's.
/// let cache = std::env::temp_dir().join(format!("ddim-hub-doc-{}", std::process::id()));
/// let repo = cache.join("models--google--ddpm-cifar10-32");
/// let commit = "267b167dc01f0e4e61923ea244e8b988f84deb80";
/// let snapshot = repo.join("snapshots").join(commit);
/// std::fs::create_dir_all(&snapshot).unwrap();
/// std::fs::create_dir_all(repo.join("refs")).unwrap();
/// std::fs::write(repo.join("refs/main"), commit).unwrap();
/// for file in ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"] {
///     std::fs::write(snapshot.join(file), "{}").unwrap();
/// }
///
/// let options = HubOptions::offline(&cache);
/// assert_eq!(resolve_model_with("google/ddpm-cifar10-32", &options)?, snapshot);
/// assert!(resolve_model_with("google/not-cached", &options).is_err());
/// assert!(resolve_model_with("../escape", &options).is_err());
/// # std::fs::remove_dir_all(&cache).unwrap();
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn resolve_model_with(spec: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if !spec.is_empty() && path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let id = match HubId::parse(spec) {
        Ok(id) => id,
        Err(why) => {
            let reason = if spec.is_empty() {
                "it is empty".to_string()
            } else if path.exists() {
                "it is a file, not a folder".to_string()
            } else {
                format!("no such folder, and not a hub id: {why}")
            };
            return Err(Error::ModelNotFound {
                spec: spec.to_string(),
                reason,
            });
        }
    };
    if options.offline {
        cached_snapshot(&id, &options.cache_dir).map_err(|detail| Error::HubNotCached {
            repo_id: id.repo_id.clone(),
            revision: id.revision.clone(),
            cache_dir: options.cache_dir.clone(),
            detail,
        })
    } else {
        download_snapshot(&id, options)
    }
}

/// A validated hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HubId {
    /// `owner/name`.
    repo_id: String,
    /// A branch, tag or commit; [`DEFAULT_REVISION`] when none was given.
    revision: String,
}

impl HubId {
    /// Parses `owner/name[@revision]`, with huggingface_hub's `validate_repo_id` rules (ASCII
    /// letters, digits, `_`, `-`, `.`; each part starts and ends with a letter, digit or `_`;
    /// no `--` or `..`; at most 96 characters), and a revision safe to use as a cache path
    /// (no `..`, no empty, hidden or absolute parts). The error says which rule failed.
    fn parse(spec: &str) -> std::result::Result<HubId, String> {
        let (repo_id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        let parts: Vec<&str> = repo_id.split('/').collect();
        if parts.len() != 2 {
            return Err(format!(
                "a hub id has exactly one `/` between owner and name, `{repo_id}` has {}",
                parts.len() - 1
            ));
        }
        if repo_id.len() > 96 {
            return Err(format!(
                "a hub id has at most 96 characters, `{repo_id}` has {}",
                repo_id.len()
            ));
        }
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for part in parts {
            if part.is_empty() {
                return Err("the owner and the name must not be empty".into());
            }
            if let Some(c) = part.chars().find(|&c| !(word(c) || c == '-' || c == '.')) {
                return Err(format!(
                    "`{c}` is not allowed in a hub id (letters, digits, `_`, `-` and `.` are)"
                ));
            }
            if !part.starts_with(word) || !part.ends_with(word) {
                return Err(format!(
                    "`{part}` must start and end with a letter, digit or `_`"
                ));
            }
        }
        if repo_id.contains("--") || repo_id.contains("..") {
            return Err("`--` and `..` are not allowed in a hub id".into());
        }
        if repo_id.ends_with(".git") {
            return Err("a hub id does not end with `.git`".into());
        }
        let revision = match revision {
            None => DEFAULT_REVISION.to_string(),
            Some(rev) => {
                validate_revision(rev)?;
                rev.to_string()
            }
        };
        Ok(HubId {
            repo_id: repo_id.to_string(),
            revision,
        })
    }

    /// The cache folder of the repo: `<cache>/models--owner--name`.
    fn repo_dir(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join(self.hf_repo().folder_name())
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }
}

/// A branch, tag or commit that is safe as a relative path under `refs/` (branches may hold `/`,
/// like `refs/pr/1`).
fn validate_revision(rev: &str) -> std::result::Result<(), String> {
    if rev.is_empty() {
        return Err("the revision after `@` must not be empty".into());
    }
    if rev.len() > 255 {
        return Err(format!(
            "a revision has at most 255 characters, this one has {}",
            rev.len()
        ));
    }
    if let Some(c) = rev
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "_-./".contains(c)))
    {
        return Err(format!(
            "`{c}` is not allowed in a revision (letters, digits, `_`, `-`, `.` and `/` are)"
        ));
    }
    if rev
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.') || part.ends_with(".lock"))
    {
        return Err(format!(
            "revision `{rev}` has an empty part, a part starting with `.` or ending in `.lock`"
        ));
    }
    Ok(())
}

/// A full commit hash, which names a snapshot folder directly.
fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached snapshot of `id`, checked to hold a UNet the loader can find; the error says what
/// is missing, for [`Error::HubNotCached`].
fn cached_snapshot(id: &HubId, cache_dir: &Path) -> std::result::Result<PathBuf, String> {
    let repo_dir = id.repo_dir(cache_dir);
    if !repo_dir.is_dir() {
        return Err(format!("there is no folder {}", repo_dir.display()));
    }
    let snapshots = repo_dir.join("snapshots");
    let snapshot = if is_commit_hash(&id.revision) && snapshots.join(&id.revision).is_dir() {
        snapshots.join(&id.revision)
    } else {
        let ref_path = repo_dir.join("refs").join(&id.revision);
        let commit = std::fs::read_to_string(&ref_path).map_err(|e| {
            format!(
                "revision `{}` was never downloaded ({}: {e})",
                id.revision,
                ref_path.display()
            )
        })?;
        let commit = commit.trim();
        // The ref names a folder: never follow one that could leave `snapshots/`.
        if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "{} does not hold a commit hash (found `{commit}`)",
                ref_path.display()
            ));
        }
        snapshots.join(commit)
    };
    if !snapshot.is_dir() {
        return Err(format!(
            "the snapshot folder {} is missing",
            snapshot.display()
        ));
    }
    find_unet_files(&snapshot).map_err(|e| format!("the cached snapshot is incomplete: {e}"))?;
    Ok(snapshot)
}

/// The repo files a diffusers UNet pipeline needs, chosen from the repo's file list: the
/// `unet/` layout when the repo has `unet/config.json`, else the flat one; single-file weights,
/// safetensors before `.bin` (as the loader prefers them). The error says what is missing.
fn files_to_fetch(files: &[&str]) -> std::result::Result<Vec<String>, String> {
    let has = |name: &str| files.contains(&name);
    let unet_config = format!("unet/{CONFIG_NAME}");
    let prefix = if has(&unet_config) {
        "unet/"
    } else if has(CONFIG_NAME) {
        ""
    } else {
        return Err(format!("it has neither {unet_config} nor {CONFIG_NAME}"));
    };
    let mut fetch = Vec::new();
    if has(MODEL_INDEX_NAME) {
        fetch.push(MODEL_INDEX_NAME.to_string());
    }
    fetch.push(format!("{prefix}{CONFIG_NAME}"));
    let safetensors = format!("{prefix}{SAFETENSORS_NAME}");
    let bin = format!("{prefix}{PYTORCH_NAME}");
    if has(&safetensors) {
        fetch.push(safetensors);
    } else if has(&bin) {
        fetch.push(bin);
    } else if has(&format!("{prefix}{SAFETENSORS_INDEX_NAME}")) {
        return Err(format!(
            "its weights are sharded ({prefix}{SAFETENSORS_INDEX_NAME}), which is not fetched \
             from the hub yet; download the repo with `huggingface-cli download` and pass the folder"
        ));
    } else {
        return Err(format!("it has neither {safetensors} nor {bin}"));
    }
    let scheduler = [
        format!("scheduler/{SCHEDULER_CONFIG_NAME}"),
        SCHEDULER_CONFIG_NAME.to_string(),
    ];
    if let Some(s) = scheduler.into_iter().find(|s| has(s)) {
        fetch.push(s);
    }
    Ok(fetch)
}

/// Fetches what [`files_to_fetch`] picks into the cache (files already there are not fetched
/// again) and returns the snapshot folder of the commit the revision points to now.
fn download_snapshot(id: &HubId, options: &HubOptions) -> Result<PathBuf> {
    let request_error = |source: Box<dyn std::error::Error + Send + Sync>| {
        let hint = match cached_snapshot(id, &options.cache_dir) {
            Ok(snapshot) => format!(
                "the files are in the cache at {}: set HF_HUB_OFFLINE=1 to use them without the network",
                snapshot.display()
            ),
            Err(_) => format!(
                "check the id and revision at {}/{}, and the network (or HF_ENDPOINT); a private \
                 or gated repo needs HF_TOKEN; once the files are cached, HF_HUB_OFFLINE=1 uses them \
                 without the network",
                options.endpoint, id.repo_id
            ),
        };
        Error::HubRequest {
            repo_id: id.repo_id.clone(),
            revision: id.revision.clone(),
            source,
            hint,
        }
    };
    let api = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_endpoint(options.endpoint.clone())
        .with_token(options.token.clone())
        .with_progress(options.progress)
        .with_user_agent("ddim", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| request_error(Box::new(e)))?;

    // One listing pins the commit, so every file lands in the same snapshot even if the branch
    // moves while we download.
    let info = api
        .repo(id.hf_repo())
        .info()
        .map_err(|e| request_error(Box::new(e)))?;
    if !is_commit_hash(&info.sha) {
        return Err(request_error(
            format!("the hub answered with commit `{}`, not a hash", info.sha).into(),
        ));
    }
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetch = files_to_fetch(&names).map_err(|reason| Error::HubRepoLayout {
        repo_id: id.repo_id.clone(),
        revision: id.revision.clone(),
        reason,
    })?;

    let pinned = HubId {
        repo_id: id.repo_id.clone(),
        revision: info.sha.clone(),
    };
    let snapshot = pinned
        .repo_dir(&options.cache_dir)
        .join("snapshots")
        .join(&info.sha);
    let repo = api.repo(pinned.hf_repo());
    for file in &fetch {
        if !snapshot.join(file).is_file() {
            repo.download(file)
                .map_err(|e| request_error(format!("downloading {file}: {e}").into()))?;
        }
    }
    // Point the revision asked for at the commit, as huggingface_hub does, so offline runs find it.
    if id.revision != info.sha {
        Cache::new(options.cache_dir.clone())
            .repo(id.hf_repo())
            .create_ref(&info.sha)
            .map_err(|source| Error::Io {
                path: id
                    .repo_dir(&options.cache_dir)
                    .join("refs")
                    .join(&id.revision),
                source,
            })?;
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(spec: &str) -> HubId {
        HubId::parse(spec).unwrap()
    }

    #[test]
    fn parses_ids_and_revisions() {
        assert_eq!(
            id("google/ddpm-cifar10-32"),
            HubId {
                repo_id: "google/ddpm-cifar10-32".into(),
                revision: "main".into()
            }
        );
        assert_eq!(id("a_b/c.d@v1.0").revision, "v1.0");
        assert_eq!(id("o/n@refs/pr/1").revision, "refs/pr/1");
    }

    #[test]
    fn refuses_bad_ids() {
        for spec in [
            "",
            "gpt2",
            "a/b/c",
            "../x",
            "./x",
            "/abs",
            "a/",
            "/b",
            "a/.b",
            "a/b.",
            "a/-b",
            "a--b/c",
            "a/b..c",
            "a/b.git",
            "a b/c",
            "a/b\\c",
            "ä/b",
            "a/b@",
            "a/b@..",
            "a/b@../../x",
            "a/b@/abs",
            "a/b@x//y",
            "a/b@.hidden",
            "a/b@x y",
            "a/b@main.lock",
        ] {
            assert!(HubId::parse(spec).is_err(), "{spec:?} was accepted");
        }
        assert!(HubId::parse(&format!("a/{}", "b".repeat(95))).is_err());
    }

    #[test]
    fn truthy_offline_values() {
        for v in ["1", "true", "TRUE", "yes", "Yes", "on", " 1 "] {
            assert!(is_truthy(v), "{v}");
        }
        for v in ["0", "false", "no", "", "off", "2"] {
            assert!(!is_truthy(v), "{v}");
        }
    }

    fn options_from(vars: &[(&str, &str)], home: Option<&str>) -> HubOptions {
        HubOptions::from_vars(
            |name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            },
            home.map(PathBuf::from),
        )
    }

    #[test]
    fn cache_dir_precedence_follows_huggingface_hub() {
        let home = Some("/home/u");
        assert_eq!(
            options_from(&[], home).cache_dir,
            Path::new("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(
            options_from(&[("XDG_CACHE_HOME", "/x")], home).cache_dir,
            Path::new("/x/huggingface/hub")
        );
        assert_eq!(
            options_from(&[("XDG_CACHE_HOME", "/x"), ("HF_HOME", "/h")], home).cache_dir,
            Path::new("/h/hub")
        );
        assert_eq!(
            options_from(
                &[("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/legacy")],
                home
            )
            .cache_dir,
            Path::new("/legacy")
        );
        assert_eq!(
            options_from(
                &[
                    ("HF_HOME", "/h"),
                    ("HUGGINGFACE_HUB_CACHE", "/legacy"),
                    ("HF_HUB_CACHE", "/c")
                ],
                home
            )
            .cache_dir,
            Path::new("/c")
        );
        // An empty variable counts as unset.
        assert_eq!(
            options_from(&[("HF_HUB_CACHE", "")], home).cache_dir,
            Path::new("/home/u/.cache/huggingface/hub")
        );
    }

    #[test]
    fn offline_endpoint_and_token_from_vars() {
        let o = options_from(
            &[
                ("HF_HUB_OFFLINE", "yes"),
                ("HF_ENDPOINT", "https://mirror.example/"),
                ("HF_TOKEN", "hf_secret"),
            ],
            None,
        );
        assert!(o.offline);
        assert_eq!(o.endpoint, "https://mirror.example");
        assert_eq!(o.token.as_deref(), Some("hf_secret"));
        assert!(!format!("{o:?}").contains("hf_secret"));
        let o = options_from(&[("HF_HUB_OFFLINE", "0")], None);
        assert!(!o.offline);
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
    }

    #[test]
    fn fetches_the_flat_layout() {
        // The file list of google/ddpm-cifar10-32 at 267b167d.
        let files = [
            ".gitattributes",
            "README.md",
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "images/generated_image_0.png",
            "model_index.json",
            "scheduler_config.json",
        ];
        assert_eq!(
            files_to_fetch(&files).unwrap(),
            [
                "model_index.json",
                "config.json",
                "diffusion_pytorch_model.safetensors",
                "scheduler_config.json"
            ]
        );
    }

    #[test]
    fn fetches_the_pipeline_layout_without_variants() {
        let files = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        assert_eq!(
            files_to_fetch(&files).unwrap(),
            [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.bin",
                "scheduler/scheduler_config.json"
            ]
        );
    }

    #[test]
    fn explains_repos_without_a_unet() {
        let err = files_to_fetch(&["README.md", "model.safetensors"]).unwrap_err();
        assert!(err.contains("unet/config.json nor config.json"), "{err}");
        let err = files_to_fetch(&["config.json", "model.safetensors"]).unwrap_err();
        assert!(err.contains("diffusion_pytorch_model.bin"), "{err}");
        let err = files_to_fetch(&[
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
        ])
        .unwrap_err();
        assert!(err.contains("sharded"), "{err}");
    }
}
