//! `ddim invert` and `ddim interpolate`.

use crate::common::*;

#[test]
fn invert_then_reconstruct_and_interpolate() {
    let dir = tmp("invert");
    let m = tiny_model();
    // A sample to invert: write one image, then invert it.
    let img = dir.join("x.png");
    let r = ddim(&[
        "sample",
        "--model",
        m,
        "--steps",
        "5",
        "-q",
        "--output",
        img.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let xt = dir.join("xt.npy");
    let rec = dir.join("rec.png");
    let r = ddim(&[
        "invert",
        "--model",
        m,
        "--input",
        img.to_str().unwrap(),
        "--steps",
        "20",
        "-q",
        "--save-tensor",
        xt.to_str().unwrap(),
        "--reconstruct",
        rec.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("PSNR"), "{out}");
    assert_eq!(ddim::npy::read_npy(&xt).unwrap().shape, vec![1, 3, 8, 8]);
    assert!(rec.exists());

    let gif = dir.join("walk.gif");
    let r = ddim(&[
        "interpolate",
        "--model",
        m,
        "--seed-a",
        "1",
        "--seed-b",
        "2",
        "--frames",
        "4",
        "--steps",
        "3",
        "-q",
        "--output",
        gif.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(gif.exists());
    let r = ddim(&[
        "interpolate",
        "--model",
        m,
        "--seed-a",
        "1",
        "--seed-b",
        "2",
        "--frames",
        "1",
        "--output",
        dir.join("g.png").to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
}
