//! Untrusted input: bad values, broken configs, safetensors and pickles, non-finite weights,
//! unwritable outputs and a full disk; exit code 2 and nothing destroyed.

use std::process::Command;

use crate::common::*;

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

/// A copy of the tiny pipeline folder with `edit` applied to its `unet/` folder.
fn broken_model(name: &str, edit: impl FnOnce(&std::path::Path)) -> TestDir {
    let dir = tmp(name);
    let src = std::path::Path::new(tiny_model());
    for sub in ["", "unet", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    edit(&dir.join("unet"));
    dir
}

fn edit_config(unet: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = unet.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Replaces the unet's weights with a PyTorch zip archive holding `pickle` as its data.pkl.
fn write_pth(unet: &std::path::Path, pickle: &[u8]) {
    use std::io::Write;
    std::fs::remove_file(unet.join(WEIGHTS)).unwrap();
    let file = std::fs::File::create(unet.join("diffusion_pytorch_model.bin")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// Runs `ddim inspect` on the model and checks exit code 2, no panic, and every needle.
fn assert_refused(model: &std::path::Path, needles: &[&str]) {
    let o = ddim(&["inspect", "--model", model.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}: {e}", model.display());
    assert!(!e.contains("panicked"), "{e}");
    for needle in needles {
        assert!(
            e.contains(needle),
            "{}: no `{needle}` in: {e}",
            model.display()
        );
    }
}

#[test]
fn broken_configs_are_refused_with_exit_code_2() {
    assert_refused(&tmp("bad-empty"), &["no UNet config found"]);
    let m = broken_model("bad-no-config", |u| {
        std::fs::remove_file(u.join("config.json")).unwrap()
    });
    assert_refused(&m, &["no UNet config found", "config.json"]);
    let m = broken_model("bad-json", |u| {
        let text = std::fs::read_to_string(u.join("config.json")).unwrap();
        std::fs::write(u.join("config.json"), &text[..text.len() / 2]).unwrap();
    });
    assert_refused(&m, &["unet/config.json", "EOF"]);
    let m = broken_model("bad-block", |u| {
        edit_config(u, |v| v["down_block_types"][0] = "FancyDownBlock2D".into())
    });
    assert_refused(&m, &["down_block_types", "FancyDownBlock2D", "DownBlock2D"]);
    let m = broken_model("bad-act", |u| {
        edit_config(u, |v| v["act_fn"] = "swishy".into())
    });
    assert_refused(&m, &["act_fn", "swishy", "silu"]);
    let m = broken_model("bad-layers", |u| {
        edit_config(u, |v| v["layers_per_block"] = 3.into())
    });
    assert_refused(&m, &["missing tensor", "down_blocks.0.resnets.2"]);
    let m = broken_model("bad-channels", |u| {
        edit_config(u, |v| v["out_channels"] = 4.into())
    });
    assert_refused(&m, &["conv_out.weight", "[4, ", "[3, "]);
}

#[test]
fn broken_safetensors_are_refused_without_huge_allocations() {
    let m = broken_model("bad-trunc", |u| {
        let bytes = std::fs::read(u.join(WEIGHTS)).unwrap();
        std::fs::write(u.join(WEIGHTS), &bytes[..bytes.len() / 2]).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "not a usable weights file"]);
    // a header length of 2^62 bytes, and a tensor of 10^10 floats in a 16-byte file
    let m = broken_model("bad-header", |u| {
        let mut bytes = (1u64 << 62).to_le_bytes().to_vec();
        bytes.extend(b"{}");
        std::fs::write(u.join(WEIGHTS), bytes).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "header too large"]);
    let m = broken_model("bad-offsets", |u| {
        let header = br#"{"conv_in.weight":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend([0u8; 16]);
        std::fs::write(u.join(WEIGHTS), bytes).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "not a usable weights file"]);
    let m = broken_model("bad-not-json", |u| {
        let mut bytes = 9u64.to_le_bytes().to_vec();
        bytes.extend(b"{not json");
        std::fs::write(u.join(WEIGHTS), bytes).unwrap();
    });
    assert_refused(&m, &[WEIGHTS, "not a usable weights file"]);
}

#[test]
fn pickles_holding_code_or_bombs_are_refused_and_nothing_runs() {
    let dir = tmp("pickle-marker");
    let marker = dir.join("executed");
    let command = format!("touch {}", marker.display());
    // os.system("touch <marker>")
    let mut p = b"\x80\x02cposix\nsystem\nX".to_vec();
    p.extend((command.len() as u32).to_le_bytes());
    p.extend(command.as_bytes());
    p.extend(b"\x85R.");
    let m = broken_model("bad-pickle-code", |u| write_pth(u, &p));
    assert_refused(
        &m,
        &[
            "diffusion_pytorch_model.bin",
            "posix.system",
            "nothing was executed",
        ],
    );
    // a state dict whose only value is that call
    let mut p2 = b"\x80\x02}X\x0e\x00\x00\x00conv_in.weightcbuiltins\nexec\nX".to_vec();
    p2.extend((command.len() as u32).to_le_bytes());
    p2.extend(command.as_bytes());
    p2.extend(b"\x85Rs.");
    let m = broken_model("bad-pickle-dict", |u| write_pth(u, &p2));
    assert_refused(&m, &["builtins.exec"]);
    assert!(!marker.exists(), "the pickle's code ran");
    // a list copied into itself 64 times: 2^64 objects if built
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..64 {
        bomb.extend(b"h\x00h\x00\x86q\x00");
    }
    bomb.push(b'.');
    let m = broken_model("bad-pickle-bomb", |u| write_pth(u, &bomb));
    assert_refused(&m, &["objects"]);
    let m = broken_model("bad-pickle-zip", |u| {
        std::fs::remove_file(u.join(WEIGHTS)).unwrap();
        std::fs::write(
            u.join("diffusion_pytorch_model.bin"),
            b"PK\x03\x04 truncated",
        )
        .unwrap();
    });
    assert_refused(&m, &["diffusion_pytorch_model.bin", "zip"]);
}

#[test]
fn non_finite_weights_warn_and_float64_noise_converts_when_exact() {
    let m = broken_model("nan-weights", |u| {
        let path = u.join(WEIGHTS);
        let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        let bias = tensors.get("conv_out.bias").unwrap();
        let mut v = bias
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[1] = f32::INFINITY;
        tensors.insert(
            "conv_out.bias".into(),
            candle_core::Tensor::new(v, &candle_core::Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    let o = ddim(&["inspect", "--model", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning") && e.contains("conv_out.bias") && e.contains("NaN or infinite"),
        "{e}"
    );

    // --noise as float64: exact values are taken, a value float32 cannot hold is an error
    let dir = tmp("noise-f64");
    let out = dir.join("o");
    let f64_npy = |name: &str, values: &[f64]| {
        let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 3, 8, 8), }";
        let mut header = format!("{dict:<117}\n").into_bytes();
        header.truncate(118);
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header);
        for v in values {
            bytes.extend(v.to_le_bytes());
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let exact: Vec<f64> = (0..192).map(|i| (i as f64 - 96.0) / 64.0).collect();
    let good = f64_npy("exact.npy", &exact);
    let mut inexact = exact.clone();
    inexact[5] = 0.1;
    let bad = f64_npy("inexact.npy", &inexact);
    let run = |noise: &std::path::Path| {
        ddim(&[
            "sample",
            "--model",
            tiny_model(),
            "--noise",
            noise.to_str().unwrap(),
            "--steps",
            "2",
            "--quiet",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let o = run(&good);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&bad);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("inexact.npy") && e.contains("flat index 5") && e.contains("float32"),
        "{e}"
    );
}

#[cfg(unix)]
#[test]
fn unwritable_outputs_and_a_full_disk_keep_what_was_there() {
    let dir = tmp("unwritable");
    let m = tiny_model();
    // an output folder under a regular file
    let file = dir.join("a-file");
    std::fs::write(&file, b"keep me").unwrap();
    let under = file.join("out");
    let sample_into = |out: &std::path::Path| {
        ddim(&[
            "sample",
            "--model",
            m,
            "--steps",
            "2",
            "--quiet",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let o = sample_into(&under);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("a-file"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // a folder without write permission (root may write anyway: then there is nothing to test)
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(locked.join("probe"), b"").is_err() {
        let o = sample_into(&locked);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("locked"), "{}", stderr(&o));
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A full disk while writing: the file size limit (ulimit -f, 512-byte blocks, with SIGXFSZ
    // ignored so writes fail with EFBIG as they would with ENOSPC) stops the --save-tensor
    // write; the previous file stays as it was and no temporary file is left.
    let tensor = dir.join("x0.npy");
    std::fs::write(&tensor, b"the previous tensor").unwrap();
    let script = format!(
        "trap '' XFSZ; ulimit -f 1; cd {}; exec \"$0\" sample --model {m} --steps 2 -n 2 \
         --quiet --overwrite --save-tensor {}",
        dir.display(),
        tensor.display()
    );
    let o = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_ddim")])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("x0.npy") && !e.contains("panicked"), "{e}");
    assert_eq!(std::fs::read(&tensor).unwrap(), b"the previous tensor");
    // (--save-tensor alone writes no PNG folder)
    assert_eq!(names(&dir), ["a-file", "locked", "x0.npy"]);
}
