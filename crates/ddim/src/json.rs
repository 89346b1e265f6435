//! diffusers' JSON. Python's `json` module writes the non-finite floats as the bare tokens
//! `NaN`, `Infinity` and `-Infinity` (diffusers saves `"lambda_min_clipped": -Infinity` in every
//! `DPMSolverMultistepScheduler` config), which strict JSON parsers reject. [`parse`] reads
//! them; [`to_python_text`] writes them back as Python does, so diffusers reads what we save.

use serde_json::Value;

/// The three tokens, as [`parse`] keeps them: strings of these names.
pub const NON_FINITE: [(&str, f64); 3] = [
    ("NaN", f64::NAN),
    ("Infinity", f64::INFINITY),
    ("-Infinity", f64::NEG_INFINITY),
];

/// Parses JSON text that may hold Python's `NaN`, `Infinity` and `-Infinity` outside strings.
/// Each such token becomes the JSON string of its name (`"-Infinity"`), which [`as_f64`]
/// reads back as the float; everything else parses as `serde_json` parses it.
pub fn parse(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str(&quote_non_finite(text))
}

/// A number, or one of the strings [`parse`] makes of the non-finite tokens.
pub fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => NON_FINITE
            .iter()
            .find(|(name, _)| name == s)
            .map(|&(_, x)| x),
        other => other.as_f64(),
    }
}

/// The Python token of a non-finite number (`None` for a finite one).
pub fn non_finite_name(x: f64) -> Option<&'static str> {
    if x.is_finite() {
        None
    } else if x.is_nan() {
        Some("NaN")
    } else if x > 0.0 {
        Some("Infinity")
    } else {
        Some("-Infinity")
    }
}

/// Pretty JSON as Python's `json.dumps(..., indent=2)` writes it, the inverse of [`parse`]: a
/// string that is exactly one of the three token names is written as the bare token.
pub fn to_python_text(value: &Value) -> serde_json::Result<String> {
    let mut out = String::new();
    write_python(value, 0, &mut out)?;
    Ok(out)
}

fn write_python(value: &Value, depth: usize, out: &mut String) -> serde_json::Result<()> {
    let indent = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    match value {
        Value::String(s) if NON_FINITE.iter().any(|(name, _)| name == s) => out.push_str(s),
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i == 0 { "" } else { "," });
                indent(out, depth + 1);
                write_python(item, depth + 1, out)?;
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                out.push_str(if i == 0 { "" } else { "," });
                indent(out, depth + 1);
                out.push_str(&serde_json::to_string(key)?);
                out.push_str(": ");
                write_python(item, depth + 1, out)?;
            }
            indent(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other)?),
    }
    Ok(())
}

/// `text` with every bare `NaN`, `Infinity` or `-Infinity` outside strings quoted.
fn quote_non_finite(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let (mut i, mut copied) = (0, 0);
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1, // skip the escaped character
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let token = NON_FINITE
            .iter()
            .map(|(name, _)| *name)
            .find(|name| bytes[i..].starts_with(name.as_bytes()));
        match token {
            Some(name) => {
                out.push_str(&text[copied..i]);
                out.push('"');
                out.push_str(name);
                out.push('"');
                i += name.len();
                copied = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&text[copied.min(text.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_tokens_parse_and_strings_are_untouched() {
        let v = parse(
            r#"{"a": -Infinity, "b": [NaN, Infinity, 1.5], "c": "NaN -Infinity \"Infinity\"", "d": null}"#,
        )
        .unwrap();
        assert_eq!(as_f64(&v["a"]), Some(f64::NEG_INFINITY));
        assert!(as_f64(&v["b"][0]).unwrap().is_nan());
        assert_eq!(as_f64(&v["b"][1]), Some(f64::INFINITY));
        assert_eq!(as_f64(&v["b"][2]), Some(1.5));
        assert_eq!(v["c"], r#"NaN -Infinity "Infinity""#);
        assert_eq!(as_f64(&v["c"]), None);
        assert_eq!(as_f64(&v["d"]), None);
    }

    #[test]
    fn python_text_reads_back_and_writes_tokens_bare() {
        let text = r#"{"a": -Infinity, "b": [NaN, 1.5, "x"], "c": {}, "d": [], "e": "-Infinity!"}"#;
        let v = parse(text).unwrap();
        let written = to_python_text(&v).unwrap();
        assert!(written.contains("\"a\": -Infinity,"), "{written}");
        assert!(written.contains("  NaN,"), "{written}");
        assert!(written.contains("\"-Infinity!\""), "{written}");
        assert_eq!(parse(&written).unwrap(), v);
        // Without tokens it is serde_json's pretty layout, which is Python's indent=2 layout.
        let plain = serde_json::json!({"k": [1, {"z": true}], "s": "t"});
        assert_eq!(
            to_python_text(&plain).unwrap(),
            serde_json::to_string_pretty(&plain).unwrap()
        );
    }

    #[test]
    fn strict_json_is_unchanged_and_bad_json_still_fails() {
        let text = r#"{"x": [1, 2e-3, "é\\\"", true], "y": {"z": -0.5}}"#;
        assert_eq!(
            parse(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        for bad in [
            "{",
            "{\"a\": Infinityx}",
            "{\"a\": -}",
            "{\"a\": \"\\",
            "NaNa",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // Multi-byte text around tokens stays intact.
        assert_eq!(parse("[\"ü\", NaN]").unwrap()[0], "ü");
    }
}
