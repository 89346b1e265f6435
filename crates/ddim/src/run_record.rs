//! The run record: what made a folder's or a file's images. The CLI keeps one beside every output
//! (`ddim-run.json` in a sample folder, `FILE.ddim-run.json` beside a single file) and compares
//! it with a later run's before it writes anything: the same settings resume, other settings are
//! refused with every difference named. This module is the record as data (its JSON form and the
//! comparison); where records live and what a refusal says belong to the CLI.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

/// The value of a record's `"format"` key.
pub const FORMAT: &str = "ddim-run-v1";

/// What made (or will make) a run's images.
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

/// One setting in which two records differ; `None` where a record does not set it.
#[derive(Clone, Debug, PartialEq)]
pub struct Difference {
    /// The setting's key (`command` for the command itself).
    pub key: String,
    /// The earlier record's value.
    pub was: Option<Value>,
    /// This run's value.
    pub now: Option<Value>,
}

impl Difference {
    /// `"key: A {was_where}, B now"`, values as JSON (`(not set)` for a missing one).
    pub fn describe(&self, was_where: &str) -> String {
        let show = |v: &Option<Value>| v.as_ref().map_or("(not set)".into(), Value::to_string);
        format!(
            "{}: {} {was_where}, {} now",
            self.key,
            show(&self.was),
            show(&self.now)
        )
    }
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

    /// The record as JSON: `format`, `command`, `settings`, `notes`.
    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "command": self.command,
            "settings": self.settings,
            "notes": self.notes,
        })
    }

    /// Reads what [`RunRecord::to_json`] wrote; the error says why `value` is not a record.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        if value.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(format!("its \"format\" is not \"{FORMAT}\""));
        }
        let command = value
            .get("command")
            .and_then(Value::as_str)
            .ok_or("it has no \"command\"")?
            .to_string();
        let map = |key: &str| -> Result<BTreeMap<String, Value>, String> {
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

    /// Every setting in which `self` (the earlier record) and `now` differ: the command first,
    /// then the settings by key. Notes are not compared.
    pub fn differences(&self, now: &RunRecord) -> Vec<Difference> {
        let mut out = Vec::new();
        if self.command != now.command {
            out.push(Difference {
                key: "command".into(),
                was: Some(self.command.clone().into()),
                now: Some(now.command.clone().into()),
            });
        }
        let keys: BTreeSet<&String> = self.settings.keys().chain(now.settings.keys()).collect();
        for key in keys {
            let (was, now) = (self.settings.get(key), now.settings.get(key));
            if was != now {
                out.push(Difference {
                    key: key.clone(),
                    was: was.cloned(),
                    now: now.cloned(),
                });
            }
        }
        out
    }
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
        let d: Vec<String> = a
            .differences(&b)
            .iter()
            .map(|d| d.describe("in the folder"))
            .collect();
        assert_eq!(
            d,
            vec![
                "dtype: (not set) in the folder, \"f16\" now".to_string(),
                "steps: 5 in the folder, 50 now".to_string()
            ]
        );
        assert!(a.differences(&record(5)).is_empty());
        let mut other = record(5);
        other.command = "invert".into();
        assert_eq!(
            a.differences(&other)[0].describe("in the file"),
            "command: \"sample\" in the file, \"invert\" now"
        );
        let back = RunRecord::from_json(&b.to_json()).unwrap();
        assert_eq!(back, b);
        assert!(RunRecord::from_json(&json!({"format": "x"})).is_err());
        assert!(
            RunRecord::from_json(&json!({"format": FORMAT, "command": "s", "settings": 1}))
                .is_err()
        );
    }

    #[test]
    fn set_all_leaves_out_the_writer_version() {
        let mut r = RunRecord::new("sample");
        r.set_all(
            "scheduler",
            &json!({"_diffusers_version": "0.1", "eta": 0.5, "_class_name": "DDIMScheduler"}),
        );
        let keys: Vec<&str> = r.settings.keys().map(String::as_str).collect();
        assert_eq!(keys, ["scheduler._class_name", "scheduler.eta"]);
    }
}
