//! The command-line contract: exit codes, outputs and error texts.

use std::process::{Command, Output};

fn ddim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args(args)
        .output()
        .expect("running ddim")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

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
fn bad_values_exit_with_2_and_name_the_value() {
    let o = ddim(&["schedule", "--timestep-spacing", "bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("bogus") && e.contains("trailing"), "{e}");

    let o = ddim(&["schedule", "--steps", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("num_inference_steps"), "{}", stderr(&o));

    let o = ddim(&["schedule", "--steps", "100000"]);
    assert_eq!(o.status.code(), Some(2));

    let o = ddim(&["schedule", "--eta", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("eta"), "{}", stderr(&o));

    let o = ddim(&["schedule", "--config", "/definitely/not/here.json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not/here.json"), "{}", stderr(&o));

    let o = ddim(&["schedule", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("panicked"));
}
