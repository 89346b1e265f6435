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

/// `interpolate --image-a/--image-b`: the ends are the images' DDIM inversions, so the first and
/// last frames are the reconstructions `ddim invert --reconstruct` writes; the record names the
/// images by content, and a seed and an image for one end are refused.
#[test]
fn interpolate_between_real_images_through_their_inversions() {
    let dir = tmp("interp-real");
    let m = tiny_model();
    let mut ends = Vec::new();
    for (k, name) in ["a.png", "b.png"].iter().enumerate() {
        let path = dir.join(name);
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            let v = ((x * 31 + y * 17 + k as u32 * 101) % 256) as u8;
            image::Rgb([v, 255 - v, v / 2])
        });
        img.save(&path).unwrap();
        let rec = dir.join(format!("rec-{name}"));
        let o = ddim(&[
            "invert",
            "--model",
            m,
            "-i",
            path.to_str().unwrap(),
            "--steps",
            "6",
            "--save-tensor",
            dir.join(format!("{name}.npy")).to_str().unwrap(),
            "--reconstruct",
            rec.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        ends.push((path, image::open(&rec).unwrap().to_rgb8()));
    }
    let strip = dir.join("strip.png");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "interpolate",
            "--model",
            m,
            "--image-a",
            ends[0].0.to_str().unwrap(),
            "--image-b",
            ends[1].0.to_str().unwrap(),
            "--steps",
            "6",
            "--frames",
            "4",
            "-q",
            "-o",
            strip.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        ddim(&a)
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let grid = image::open(&strip).unwrap().to_rgb8();
    // one row of 4 frames of 8×8 with 2 pixels of padding
    assert_eq!((grid.width(), grid.height()), (4 * 10 + 2, 12));
    for (frame, (_, rec)) in [(0u32, &ends[0]), (3, &ends[1])] {
        for (x, y, p) in rec.enumerate_pixels() {
            assert_eq!(
                grid.get_pixel(2 + frame * 10 + x, 2 + y),
                p,
                "frame {frame} at ({x}, {y})"
            );
        }
    }
    let record = std::fs::read_to_string(dir.join("strip.png.ddim-run.json")).unwrap();
    assert!(
        record.contains("image_a_sha256") && !record.contains("seed_a"),
        "{record}"
    );
    // the same settings: nothing to do; another image for an end: refused
    assert!(run(&[]).status.success());
    std::fs::copy(&ends[1].0, &ends[0].0).unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("image_a_sha256"), "{}", stderr(&o));
    let o = run(&["--seed-a", "3", "--overwrite"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `ddim inpaint`: the white part of the mask keeps the image, the black is repainted; the
/// record names the image and mask by content; bad options exit 2 with nothing written.
#[test]
fn inpaint_keeps_the_white_part_and_repaints_the_black() {
    let dir = tmp("inpaint");
    let img = dir.join("x.png");
    let mask = dir.join("m.png");
    image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 77])
    })
    .save(&img)
    .unwrap();
    image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x < 4 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let out = dir.join("out.png");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "inpaint",
            "--model",
            tiny_model(),
            "-i",
            img.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--steps",
            "10",
            "--jump-length",
            "3",
            "--jump-n-sample",
            "2",
            "-n",
            "2",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        ddim(&a)
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = image::open(&img).unwrap().to_rgb8();
    let row = image::open(&out).unwrap().to_rgb8();
    assert_eq!((row.width(), row.height()), (2 * 10 + 2, 12));
    for k in 0..2u32 {
        let mut changed = 0;
        for (x, y, p) in want.enumerate_pixels() {
            let got = row.get_pixel(2 + k * 10 + x, 2 + y);
            if x < 4 {
                for c in 0..3 {
                    assert!(
                        (got[c] as i32 - p[c] as i32).abs() <= 1,
                        "image {k} kept pixel ({x}, {y}) changed: {got:?} against {p:?}"
                    );
                }
            } else if got != p {
                changed += 1;
            }
        }
        assert!(
            changed > 16,
            "image {k}: only {changed} repainted pixels differ"
        );
    }
    let record = std::fs::read_to_string(dir.join("out.png.ddim-run.json")).unwrap();
    assert!(
        record.contains("mask_sha256") && record.contains("jump_n_sample"),
        "{record}"
    );
    // the same settings: nothing to do; another seed: refused without --overwrite
    assert!(run(&[]).status.success());
    assert_eq!(run(&["--seed", "1"]).status.code(), Some(2));
    for (extra, needle) in [
        (&["--steps", "0"][..], "--steps"),
        (&["--steps", "5000"][..], "--steps"),
        (&["--jump-length", "0"][..], "--jump-length"),
        (&["--eta", "-1"][..], "--eta"),
        (&["-n", "0"][..], "-n 0"),
    ] {
        let fresh = dir.join("never.png");
        let o = ddim(
            &[
                &[
                    "inpaint",
                    "--model",
                    tiny_model(),
                    "-i",
                    img.to_str().unwrap(),
                    "--mask",
                    mask.to_str().unwrap(),
                    "-q",
                    "-o",
                    fresh.to_str().unwrap(),
                ][..],
                extra,
            ]
            .concat(),
        );
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{extra:?}: {}", stderr(&o));
        assert!(!fresh.exists());
    }
}
