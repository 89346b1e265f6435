//! Entry points for the cargo-fuzz targets in `fuzz/` and for the test that replays their
//! corpus on stable Rust (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, runs one parser
//! of untrusted input, and must return (with an error or not) without panicking, hanging or
//! allocating without bound. Not part of the stable API.

use candle_core::{DType, Device};

use crate::scheduler::{DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, SchedulerConfig};

/// The unet config the `safetensors` target loads weights for: the tiny model of the test
/// fixtures (`tests/fixtures/pipeline/tiny-ddpm`), whose weights seed that target's corpus.
pub const TINY_UNET_CONFIG: &str =
    include_str!("../tests/fixtures/pipeline/tiny-ddpm/unet/config.json");

/// A `scheduler_config.json`: parse it, then build each scheduler and set 1, 10 and 50 steps.
pub fn scheduler_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = SchedulerConfig::from_json_str(text) else {
        return;
    };
    let config = loaded.config;
    for steps in [1, 10, 50] {
        if let Ok(mut s) = DDIMScheduler::new(&config) {
            let _ = s.set_timesteps(steps);
        }
        if let Ok(mut s) = DDPMScheduler::new(&config) {
            let _ = s.set_timesteps(steps);
        }
        if let Ok(mut s) = DDIMInverseScheduler::new(&config) {
            let _ = s.set_timesteps(steps);
        }
    }
}

/// A unet `config.json`: parse and check it (the model is not built: a valid config may ask for
/// any size of model).
pub fn unet_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::unet::UNet2DConfig::from_json_str(text);
    }
}

/// A safetensors file as the weights of [`TINY_UNET_CONFIG`].
pub fn safetensors(data: &[u8]) {
    let _ = crate::loader::load_unet_from_bytes(
        TINY_UNET_CONFIG,
        data.to_vec(),
        "fuzz input",
        DType::F32,
        &Device::Cpu,
    );
}

/// A pickle (a `.bin` file's `data.pkl`): the check of [`crate::pth`], and where it passes,
/// candle's pickle reader, which must then cope.
pub fn pickle(data: &[u8]) {
    if crate::pth::check_pickle_bytes(data).is_err() {
        return;
    }
    let mut stack = candle_core::pickle::Stack::empty();
    let mut reader = std::io::BufReader::new(data);
    if stack.read_loop(&mut reader).is_ok() {
        let _ = stack.finalize();
    }
}

/// A `.npy` file.
pub fn npy(data: &[u8]) {
    let _ = crate::npy::read_npy_bytes(data, std::path::Path::new("fuzz.npy"));
}

/// diffusers' JSON (Python's `NaN` / `Infinity` tokens), as configs and run records are read:
/// [`crate::json::parse`] must agree with a strict parser wherever that one accepts the text,
/// and what it returns must serialise to strict JSON that parses back to the same value.
pub fn json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = crate::json::parse(text) else {
        return;
    };
    if let Ok(strict) = serde_json::from_str::<serde_json::Value>(text) {
        assert_eq!(strict, value, "strict JSON must parse unchanged");
    }
    let mut stack = vec![&value];
    while let Some(v) = stack.pop() {
        let _ = crate::json::as_f64(v);
        match v {
            serde_json::Value::Array(items) => stack.extend(items),
            serde_json::Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    let written = serde_json::to_string(&value).expect("a parsed value serialises");
    let back: serde_json::Value = serde_json::from_str(&written).expect("what we write is JSON");
    assert_eq!(back, value);
    // As a run record (the CLI reads `ddim-run.json` files with this parser): one that reads
    // writes back to itself and differs from itself in nothing.
    if let Ok(record) = crate::run_record::RunRecord::from_json(&value) {
        assert!(record.differences(&record).is_empty());
        let again = crate::run_record::RunRecord::from_json(&record.to_json())
            .expect("a written record reads");
        assert_eq!(again, record);
    }
}
