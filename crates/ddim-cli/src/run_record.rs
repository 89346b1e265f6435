//! The run record: `ddim-run.json` in every output folder, written atomically before the
//! first image, naming everything that determines the folder's images (the model's hash, the
//! sampler and its effective config, steps, η, noise, dtype, image size, ...). A later run into
//! the folder compares its own record with it: the same settings resume (or add images), other
//! settings are refused with every difference named, so a folder never mixes images of two
//! settings without the user asking for it (`--overwrite`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::UsageError;

/// The record's file name in an output folder.
pub const RECORD_NAME: &str = "ddim-run.json";
const FORMAT: &str = "ddim-run-v1";

/// What made (or will make) a folder's images.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// The command: `sample`, `invert`, `interpolate` or `eval`.
    pub command: String,
    /// Everything that determines the images; compared key by key.
    pub settings: BTreeMap<String, Value>,
    /// Kept for the reader, not compared: the tool version, where the model was read from, the
    /// batch size and device (which move only float rounding).
    pub notes: BTreeMap<String, Value>,
}

impl RunRecord {
    /// A record of `command` with no settings yet; the tool version goes in the notes.
    pub fn new(command: &str) -> Self {
        let mut notes = BTreeMap::new();
        notes.insert(
            "ddim_version".into(),
            Value::from(env!("CARGO_PKG_VERSION")),
        );
        RunRecord {
            command: command.into(),
            settings: BTreeMap::new(),
            notes,
        }
    }

    /// Adds a compared setting.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// Adds a note (not compared).
    pub fn note(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.notes.insert(key.into(), value.into());
        self
    }

    /// Adds every key of a JSON object as the setting `{prefix}.{key}`, so that a difference
    /// names the key that differs (not `_diffusers_version`, which says only who wrote it).
    pub fn set_all(&mut self, prefix: &str, object: &Value) -> &mut Self {
        if let Some(map) = object.as_object() {
            for (k, v) in map.iter().filter(|(k, _)| *k != "_diffusers_version") {
                self.settings.insert(format!("{prefix}.{k}"), v.clone());
            }
        }
        self
    }

    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "command": self.command,
            "settings": self.settings,
            "notes": self.notes,
        })
    }

    /// Reads what [`RunRecord::to_json`] wrote; the error says what is wrong.
    pub fn from_json(value: &Value) -> std::result::Result<Self, String> {
        if value.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(format!("its \"format\" is not \"{FORMAT}\""));
        }
        let command = value
            .get("command")
            .and_then(Value::as_str)
            .ok_or("it has no \"command\"")?
            .to_string();
        let map = |key: &str| -> std::result::Result<BTreeMap<String, Value>, String> {
            match value.get(key) {
                Some(Value::Object(m)) => {
                    Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                }
                None => Ok(BTreeMap::new()),
                Some(_) => Err(format!("its \"{key}\" is not an object")),
            }
        };
        Ok(RunRecord {
            command,
            settings: map("settings")?,
            notes: map("notes")?,
        })
    }

    /// Every setting in which `self` (the folder's) and `now` differ, as
    /// `"key: A in the folder, B now"`, the command first.
    pub fn differences(&self, now: &RunRecord) -> Vec<String> {
        let show = |v: Option<&Value>| v.map_or_else(|| "(not set)".to_string(), Value::to_string);
        let mut out = Vec::new();
        if self.command != now.command {
            out.push(format!(
                "command: {} in the folder, {} now",
                self.command, now.command
            ));
        }
        let keys: std::collections::BTreeSet<&String> =
            self.settings.keys().chain(now.settings.keys()).collect();
        for key in keys {
            let (a, b) = (self.settings.get(key), now.settings.get(key));
            if a != b {
                out.push(format!("{key}: {} in the folder, {} now", show(a), show(b)));
            }
        }
        out
    }
}

/// What [`claim_folder`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A new folder, or one without images of ours: the record was written.
    Fresh,
    /// The folder's record equals this run's: go on from what is there.
    Same,
}

/// Makes `dir` this run's folder, before anything is written to it: creates it and writes the
/// record when it is new or holds no images of ours (`is_ours` tells them by name); accepts it
/// when its record equals `record`. Otherwise it refuses (exit 2) and touches nothing: the
/// message names every setting that differs with both values, or says that the images were
/// made before ddim kept records. With `overwrite` it removes the folder's images (the files
/// `remove` accepts) and writes this run's record, whatever was there: the folder starts afresh.
pub fn claim_folder(
    dir: &Path,
    record: &RunRecord,
    overwrite: bool,
    is_ours: &dyn Fn(&str) -> bool,
    remove: &dyn Fn(&str) -> bool,
) -> Result<Claim> {
    let path = dir.join(RECORD_NAME);
    if overwrite {
        if dir.is_dir() {
            for file in list_files(dir, remove)? {
                std::fs::remove_file(&file)
                    .with_context(|| format!("removing {} (--overwrite)", file.display()))?;
            }
        }
        ddim::image_io::ensure_writable_dir(dir)?;
        write_record(&path, record)?;
        return Ok(Claim::Fresh);
    }
    let existing = read_record(&path)?;
    let ours = if dir.is_dir() {
        list_files(dir, is_ours)?
    } else {
        Vec::new()
    };
    let problem = match &existing {
        Some(old) if old.differences(record).is_empty() => return Ok(Claim::Same),
        Some(old) => format!(
            "{} holds images made with other settings ({} records them):\n  {}\n",
            dir.display(),
            path.display(),
            old.differences(record).join("\n  ")
        ),
        None if ours.is_empty() => {
            ddim::image_io::ensure_writable_dir(dir)?;
            write_record(&path, record)?;
            return Ok(Claim::Fresh);
        }
        None => format!(
            "{} holds {} image(s) of ddim (e.g. {}) but no {RECORD_NAME}: they were made before \
             ddim recorded the settings of a run, so whether they match this run's is unknown.\n",
            dir.display(),
            ours.len(),
            ours[0].display()
        ),
    };
    Err(UsageError(format!(
        "{problem}Nothing was changed. Pass --overwrite to replace the folder's images with this \
         run's, or write to another folder."
    ))
    .into())
}

/// The record in `path`, if there is one; a record that cannot be read is an error that says so.
pub fn read_record(path: &Path) -> Result<Option<RunRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ddim::Error::io(path, e).into()),
    };
    let value = ddim::json::parse(&text).map_err(|source| ddim::Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    RunRecord::from_json(&value).map(Some).map_err(|why| {
        UsageError(format!(
            "{}: not a run record of this ddim ({why}); move it away or pass --overwrite",
            path.display()
        ))
        .into()
    })
}

/// Writes the record atomically.
pub fn write_record(path: &Path, record: &RunRecord) -> Result<()> {
    let text = serde_json::to_string_pretty(&record.to_json())? + "\n";
    ddim::npy::write_atomically(path, |w| w.write_all(text.as_bytes()))?;
    Ok(())
}

/// The files directly in `dir` whose names `keep` accepts, sorted.
fn list_files(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ddim::Error::io(dir, e))? {
        let entry = entry.map_err(|e| ddim::Error::io(dir, e))?;
        let name = entry.file_name();
        if entry.file_type().is_ok_and(|t| t.is_file()) && name.to_str().is_some_and(keep) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// A hex SHA-256 over byte strings, each prefixed by its length (so that no two lists of parts
/// hash alike).
pub fn sha256_hex<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// [`sha256_hex`] of the files' contents, read in pieces.
pub fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for path in paths {
        let mut file = std::fs::File::open(path).map_err(|e| ddim::Error::io(path, e))?;
        let len = file.metadata().map_err(|e| ddim::Error::io(path, e))?.len();
        h.update(len.to_le_bytes());
        let copied = std::io::copy(&mut file, &mut h).map_err(|e| ddim::Error::io(path, e))?;
        if copied != len {
            return Err(UsageError(format!("{} changed while it was read", path.display())).into());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(steps: u64) -> RunRecord {
        let mut r = RunRecord::new("sample");
        r.set("steps", steps).set("eta", 0.0);
        r
    }

    #[test]
    fn differences_name_both_values() {
        let (a, mut b) = (record(5), record(50));
        b.set("dtype", "f16");
        b.note("batch_size", 7);
        let d = a.differences(&b);
        assert_eq!(
            d,
            vec![
                "dtype: (not set) in the folder, \"f16\" now".to_string(),
                "steps: 5 in the folder, 50 now".to_string()
            ]
        );
        assert!(a.differences(&record(5)).is_empty());
        let back = RunRecord::from_json(&b.to_json()).unwrap();
        assert_eq!(back, b);
        assert!(RunRecord::from_json(&json!({"format": "x"})).is_err());
        assert!(
            RunRecord::from_json(&json!({"format": FORMAT, "command": "s", "settings": 1}))
                .is_err()
        );
    }

    #[test]
    fn hash_separates_parts_and_files_hash_as_bytes() {
        assert_ne!(
            sha256_hex([&b"ab"[..], b"c"]),
            sha256_hex([&b"a"[..], b"bc"])
        );
        assert_eq!(sha256_hex([&b"x"[..]]).len(), 64);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"ab").unwrap();
        std::fs::write(&b, b"c").unwrap();
        assert_eq!(
            sha256_files(&[a, b]).unwrap(),
            sha256_hex([&b"ab"[..], b"c"])
        );
    }
}
