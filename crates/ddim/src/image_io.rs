//! Tensors in model space (NCHW f32 in [-1, 1]) to and from images, following diffusers'
//! `VaeImageProcessor` (`pt_to_numpy`, `numpy_to_pil`, `pil_to_numpy`, `normalize`); image
//! grids, nearest-neighbour upscaling, PNG and animated GIF writing, and output file names
//! (numbered, or seed-indexed for resumable runs).
//!
//! Every file is written atomically (temporary file in the same directory, fsync, rename), so a
//! failed write never destroys an existing file.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::imageops::FilterType;
use image::{Delay, DynamicImage, Frame, GrayImage, ImageBuffer, Luma, Pixel, RgbImage, RgbaImage};

use crate::atomic::write_atomically;
use crate::{Error, Result};

/// The largest image (in bytes of pixel data) that [`make_grid`] and [`upscale_nearest`] build:
/// 4 GiB, far past any sensible output, so a typo in a factor or padding errors out instead of
/// exhausting memory.
pub const MAX_IMAGE_BYTES: u64 = 1 << 32;

/// Converts a batch in model space to 8-bit images, exactly as diffusers does:
/// `(x / 2 + 0.5).clamp(0, 1)`, then numpy's `(images * 255).round().astype("uint8")`
/// (round half to even), all in f32.
///
/// `x` is (b, c, h, w) of any float dtype on any device; c = 1 gives `Luma8` images, c = 3
/// `Rgb8`. A NaN in `x` is an error naming its position (diffusers would write an arbitrary byte).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ddim::image_io::to_images;
///
/// // (1, 3, 1, 2): a black and a white pixel.
/// let x = Tensor::new(&[-1f32, 1.0, -1.0, 1.0, -1.0, 1.0], &Device::Cpu)?.reshape((1, 3, 1, 2))?;
/// let images = to_images(&x)?;
/// assert_eq!(images[0].to_rgb8().get_pixel(1, 0).0, [255, 255, 255]);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn to_images(x: &Tensor) -> Result<Vec<DynamicImage>> {
    let (b, c, h, w) = match x.dims() {
        &[b, c, h, w] => (b, c, h, w),
        dims => {
            return Err(Error::argument(
                "x",
                format!("a tensor of shape {dims:?}"),
                "a batch of images of shape (b, c, h, w)",
            ))
        }
    };
    if c != 1 && c != 3 {
        return Err(Error::argument(
            "x",
            format!("a tensor with {c} channels (shape {:?})", x.dims()),
            "1 channel (grayscale) or 3 channels (RGB)",
        ));
    }
    let (w32, h32) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w32), Ok(h32)) => (w32, h32),
        _ => {
            return Err(Error::argument(
                "x",
                format!("images of {w}x{h} pixels"),
                "width and height below 2^32",
            ))
        }
    };
    let values = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let mut images = Vec::with_capacity(b);
    for n in 0..b {
        // (c, h, w) -> (h, w, c)
        let mut pixels = Vec::with_capacity(plane * c);
        for p in 0..plane {
            for ch in 0..c {
                let index = (n * c + ch) * plane + p;
                pixels.push(to_u8(values[index]).ok_or_else(|| {
                    Error::argument(
                        "x",
                        format!("NaN at (b, c, h, w) = ({n}, {ch}, {}, {})", p / w, p % w),
                        "finite values; the sampler diverged",
                    )
                })?);
            }
        }
        let image = if c == 1 {
            GrayImage::from_raw(w32, h32, pixels).map(DynamicImage::ImageLuma8)
        } else {
            RgbImage::from_raw(w32, h32, pixels).map(DynamicImage::ImageRgb8)
        };
        // from_raw only fails when the buffer is shorter than w * h * c, which it is not.
        images.push(image.ok_or_else(|| {
            Error::argument("x", format!("{:?}", x.dims()), "a consistent shape")
        })?);
    }
    Ok(images)
}

/// One model-space value to a byte, as diffusers: `round_half_even(clamp(x / 2 + 0.5, 0, 1) * 255)`
/// in f32; `None` for NaN.
fn to_u8(x: f32) -> Option<u8> {
    if x.is_nan() {
        return None;
    }
    let y = (x / 2.0 + 0.5).clamp(0.0, 1.0);
    // In [0, 255] after the clamp, so the cast is exact.
    Some((y * 255.0).round_ties_even() as u8)
}

/// Converts an image to a (1, c, h, w) f32 tensor on the CPU in model space, `x = 2 * (p / 255) - 1` as in
/// diffusers' `pil_to_numpy` and `normalize`.
///
/// `channels` is 1 (grayscale) or 3 (RGB). Colour is turned to gray with PIL's `convert("L")`
/// weights (ITU-R 601-2: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`); gray is replicated to RGB;
/// alpha is dropped, as PIL's `convert("RGB")` does. `size` is `(width, height)`; when given the
/// image is resized to exactly that with a Lanczos3 filter (PIL's `LANCZOS`, diffusers' default),
/// after the channel conversion and in 8 bits, as PIL does.
///
/// ```
/// use ddim::image_io::from_image;
/// use image::{DynamicImage, RgbImage};
///
/// let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 4, image::Rgb([255, 0, 255])));
/// let x = from_image(&img, 3, Some((4, 2)))?;
/// assert_eq!(x.dims(), &[1, 3, 2, 4]);
/// assert_eq!(x.flatten_all()?.to_vec1::<f32>()?[0], 1.0);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn from_image(img: &DynamicImage, channels: usize, size: Option<(u32, u32)>) -> Result<Tensor> {
    if let Some((w, h)) = size {
        if w == 0 || h == 0 {
            return Err(Error::argument(
                "size",
                format!("{w}x{h}"),
                "a width and height of at least 1 pixel",
            ));
        }
    }
    let resize = |buf: DynamicImage| match size {
        Some((w, h)) if (w, h) != (buf.width(), buf.height()) => {
            buf.resize_exact(w, h, FilterType::Lanczos3)
        }
        _ => buf,
    };
    let (w, h, bytes) = match channels {
        1 => {
            let gray = resize(DynamicImage::ImageLuma8(to_gray_like_pil(img))).into_luma8();
            (gray.width(), gray.height(), gray.into_raw())
        }
        3 => {
            let rgb = resize(DynamicImage::ImageRgb8(img.to_rgb8())).into_rgb8();
            (rgb.width(), rgb.height(), rgb.into_raw())
        }
        _ => {
            return Err(Error::argument(
                "channels",
                channels,
                "1 (grayscale) or 3 (RGB)",
            ))
        }
    };
    let (w, h) = (w as usize, h as usize);
    // (h, w, c) -> (c, h, w)
    let mut data = Vec::with_capacity(bytes.len());
    for ch in 0..channels {
        for p in 0..h * w {
            let v = f32::from(bytes[p * channels + ch]) / 255.0;
            data.push(2.0 * v - 1.0);
        }
    }
    Ok(Tensor::from_vec(data, (1, channels, h, w), &Device::Cpu)?)
}

/// Grayscale as PIL's `Image.convert("L")`; gray images of any depth keep their gray values.
fn to_gray_like_pil(img: &DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => img.to_luma8(),
        _ => {
            let rgb = img.to_rgb8();
            ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
                let [r, g, b] = rgb.get_pixel(x, y).0;
                let l =
                    (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000)
                        >> 16;
                // At most 255: the weights sum to 2^16.
                Luma([l as u8])
            })
        }
    }
}

/// Loads an image file (PNG, JPEG or GIF; the format is read from the content) as a
/// (1, c, h, w) model-space tensor; see [`from_image`] for `channels` and `size`. Errors name
/// the file.
///
/// ```
/// use ddim::image_io::{load_image, save_png};
/// use image::{DynamicImage, GrayImage};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("in.png");
/// save_png(&DynamicImage::ImageLuma8(GrayImage::new(4, 4)), &path)?;
/// let x = load_image(&path, 1, None)?;
/// assert_eq!(x.dims(), &[1, 1, 4, 4]);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn load_image(path: &Path, channels: usize, size: Option<(u32, u32)>) -> Result<Tensor> {
    from_image(&open_image(path)?, channels, size)
}

/// Decodes an image file (PNG, JPEG or GIF; the format is read from the content) as it is
/// stored, with no conversion. Errors name the file.
///
/// ```
/// use ddim::image_io::{open_image, save_png};
/// use image::{DynamicImage, GrayImage};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("in.png");
/// save_png(&DynamicImage::ImageLuma8(GrayImage::new(4, 3)), &path)?;
/// assert_eq!(open_image(&path)?.height(), 3);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn open_image(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| {
            Error::image(
                path,
                format!("cannot decode the image ({e}); PNG, JPEG and GIF are supported"),
            )
        })
}

/// Scales an image up by an integer factor `k` (≥ 1) with nearest-neighbour sampling: each pixel
/// becomes a k×k block, so small samples stay crisp when viewed.
///
/// ```
/// use ddim::image_io::upscale_nearest;
/// use image::{DynamicImage, GrayImage, Luma};
///
/// let img = DynamicImage::ImageLuma8(GrayImage::from_fn(2, 1, |x, _| Luma([x as u8 * 200])));
/// let big = upscale_nearest(&img, 3)?;
/// assert_eq!((big.width(), big.height()), (6, 3));
/// assert_eq!(big.to_luma8().get_pixel(3, 2).0, [200]);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn upscale_nearest(img: &DynamicImage, k: u32) -> Result<DynamicImage> {
    if k == 0 {
        return Err(Error::argument("k", k, "an upscaling factor of at least 1"));
    }
    let (w, h) = checked_dims(
        u64::from(img.width()) * u64::from(k),
        u64::from(img.height()) * u64::from(k),
        img.color().bytes_per_pixel(),
        "k",
        k,
    )?;
    fn up<P: Pixel>(
        buf: &ImageBuffer<P, Vec<P::Subpixel>>,
        w: u32,
        h: u32,
        k: u32,
    ) -> ImageBuffer<P, Vec<P::Subpixel>> {
        ImageBuffer::from_fn(w, h, |x, y| *buf.get_pixel(x / k, y / k))
    }
    Ok(match img {
        DynamicImage::ImageLuma8(b) => DynamicImage::ImageLuma8(up(b, w, h, k)),
        DynamicImage::ImageLumaA8(b) => DynamicImage::ImageLumaA8(up(b, w, h, k)),
        DynamicImage::ImageRgb8(b) => DynamicImage::ImageRgb8(up(b, w, h, k)),
        DynamicImage::ImageRgba8(b) => DynamicImage::ImageRgba8(up(b, w, h, k)),
        DynamicImage::ImageLuma16(b) => DynamicImage::ImageLuma16(up(b, w, h, k)),
        DynamicImage::ImageLumaA16(b) => DynamicImage::ImageLumaA16(up(b, w, h, k)),
        DynamicImage::ImageRgb16(b) => DynamicImage::ImageRgb16(up(b, w, h, k)),
        DynamicImage::ImageRgba16(b) => DynamicImage::ImageRgba16(up(b, w, h, k)),
        DynamicImage::ImageRgb32F(b) => DynamicImage::ImageRgb32F(up(b, w, h, k)),
        other => DynamicImage::ImageRgba32F(up(&other.to_rgba32f(), w, h, k)),
    })
}

/// Checks that a `w`×`h` image of `bpp` bytes per pixel fits u32 sides and [`MAX_IMAGE_BYTES`].
fn checked_dims(
    w: u64,
    h: u64,
    bpp: u8,
    name: &str,
    value: impl std::fmt::Display,
) -> Result<(u32, u32)> {
    let bytes = w.checked_mul(h).and_then(|p| p.checked_mul(u64::from(bpp)));
    match (u32::try_from(w), u32::try_from(h), bytes) {
        (Ok(w32), Ok(h32), Some(b)) if b <= MAX_IMAGE_BYTES => Ok((w32, h32)),
        _ => Err(Error::argument(
            name,
            value,
            format!("a value giving an image of at most {MAX_IMAGE_BYTES} bytes (this one would be {w}x{h} pixels)"),
        )),
    }
}

/// Tiles images of one size into a grid, row by row, like torchvision's `make_grid`: `ncols`
/// columns (default `ceil(sqrt(n))`, at most n), `padding` black pixels between images and around
/// the border. The result is `Luma8` when every image is `Luma8`, `Rgba8` when any has alpha,
/// `Rgb8` otherwise.
///
/// ```
/// use ddim::image_io::make_grid;
/// use image::{DynamicImage, RgbImage};
///
/// let images = vec![DynamicImage::ImageRgb8(RgbImage::new(8, 8)); 5];
/// let grid = make_grid(&images, None, 2)?; // 3 columns, 2 rows
/// assert_eq!((grid.width(), grid.height()), (3 * 10 + 2, 2 * 10 + 2));
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn make_grid(
    images: &[DynamicImage],
    ncols: Option<usize>,
    padding: u32,
) -> Result<DynamicImage> {
    let first = images
        .first()
        .ok_or_else(|| Error::argument("images", "an empty list", "at least one image"))?;
    let (w, h) = (first.width(), first.height());
    if let Some((i, img)) = images
        .iter()
        .enumerate()
        .find(|(_, img)| (img.width(), img.height()) != (w, h))
    {
        return Err(Error::argument(
            "images",
            format!("image {i} of {}x{} pixels", img.width(), img.height()),
            format!("all images the size of the first, {w}x{h}"),
        ));
    }
    let n = images.len();
    let ncols = match ncols {
        Some(0) => return Err(Error::argument("ncols", 0, "at least 1 column")),
        Some(c) => c.min(n),
        // ceil(sqrt(n)) in integers: the smallest c with c * c >= n.
        None => (1..=n).find(|c| c * c >= n).unwrap_or(n),
    };
    let nrows = n.div_ceil(ncols);
    let pad = u64::from(padding);
    let gw = ncols as u64 * (u64::from(w) + pad) + pad;
    let gh = nrows as u64 * (u64::from(h) + pad) + pad;
    let all_gray = images
        .iter()
        .all(|img| matches!(img, DynamicImage::ImageLuma8(_)));
    let any_alpha = images.iter().any(|img| img.color().has_alpha());
    let bpp = if all_gray {
        1
    } else if any_alpha {
        4
    } else {
        3
    };
    let (gw, gh) = checked_dims(gw, gh, bpp, "padding", padding)?;
    let origin = |i: usize| {
        let (row, col) = ((i / ncols) as u64, (i % ncols) as u64);
        (
            (col * (u64::from(w) + pad) + pad) as i64,
            (row * (u64::from(h) + pad) + pad) as i64,
        )
    };
    Ok(if all_gray {
        let mut grid = GrayImage::new(gw, gh);
        for (i, img) in images.iter().enumerate() {
            let (x, y) = origin(i);
            image::imageops::replace(&mut grid, &img.to_luma8(), x, y);
        }
        DynamicImage::ImageLuma8(grid)
    } else if any_alpha {
        let mut grid = RgbaImage::new(gw, gh);
        for (i, img) in images.iter().enumerate() {
            let (x, y) = origin(i);
            image::imageops::replace(&mut grid, &img.to_rgba8(), x, y);
        }
        DynamicImage::ImageRgba8(grid)
    } else {
        let mut grid = RgbImage::new(gw, gh);
        for (i, img) in images.iter().enumerate() {
            let (x, y) = origin(i);
            image::imageops::replace(&mut grid, &img.to_rgb8(), x, y);
        }
        DynamicImage::ImageRgb8(grid)
    })
}

/// Saves an image as PNG, atomically: the file at `path` is either the old one or the complete
/// new one, never a partial write. A missing parent directory is created.
///
/// ```
/// use ddim::image_io::save_png;
/// use image::{DynamicImage, RgbImage};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("out.png");
/// save_png(&DynamicImage::ImageRgb8(RgbImage::new(2, 2)), &path)?;
/// assert_eq!(image::open(&path).unwrap().width(), 2);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn save_png(img: &DynamicImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_with_encoder(PngEncoder::new(&mut Cursor::new(&mut bytes)))
        .map_err(|e| {
            Error::image(
                path,
                format!("cannot encode a {:?} image as PNG: {e}", img.color()),
            )
        })?;
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
}

/// Saves frames of one size as an animated GIF, atomically (see [`save_png`]). `delay_ms` is the
/// time each frame shows (GIF stores it in 10 ms units); `loop_forever` makes viewers repeat the
/// animation, otherwise it plays once. Frames are converted to RGBA (gray replicated) and each
/// is quantised to at most 256 colours by the `image` crate's GIF encoder.
///
/// ```
/// use ddim::image_io::save_gif;
/// use image::{DynamicImage, GrayImage};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("steps.gif");
/// let frames: Vec<_> = (0..3u8).map(|i| DynamicImage::ImageLuma8(GrayImage::from_pixel(4, 4, image::Luma([i * 100])))).collect();
/// save_gif(&frames, &path, 100, true)?;
/// assert!(path.exists());
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn save_gif(
    frames: &[DynamicImage],
    path: &Path,
    delay_ms: u32,
    loop_forever: bool,
) -> Result<()> {
    let first = frames
        .first()
        .ok_or_else(|| Error::argument("frames", "an empty list", "at least one frame"))?;
    let (w, h) = (first.width(), first.height());
    if w > u32::from(u16::MAX) || h > u32::from(u16::MAX) {
        return Err(Error::argument(
            "frames",
            format!("frames of {w}x{h} pixels"),
            "at most 65535x65535 pixels, the GIF limit",
        ));
    }
    if let Some((i, f)) = frames
        .iter()
        .enumerate()
        .find(|(_, f)| (f.width(), f.height()) != (w, h))
    {
        return Err(Error::argument(
            "frames",
            format!("frame {i} of {}x{} pixels", f.width(), f.height()),
            format!("all frames the size of the first, {w}x{h}"),
        ));
    }
    let gif_error =
        |e: image::ImageError| Error::image(path, format!("cannot encode the GIF: {e}"));
    let mut bytes = Vec::new();
    {
        // Speed 10 of 1..=30: gif's recommended balance of quantisation quality and time.
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        encoder
            .set_repeat(if loop_forever {
                Repeat::Infinite
            } else {
                Repeat::Finite(0)
            })
            .map_err(gif_error)?;
        let delay = Delay::from_numer_denom_ms(delay_ms, 1);
        for f in frames {
            encoder
                .encode_frame(Frame::from_parts(f.to_rgba8(), 0, 0, delay))
                .map_err(gif_error)?;
        }
        // Dropping the encoder writes the GIF trailer.
    }
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
}

/// The path `dir/{prefix}_{index:05}.{ext}`, e.g. `sample_00042.png`; indices of 100000 and up
/// get more digits. `ext` may be given with or without its leading dot.
///
/// ```
/// use std::path::Path;
/// use ddim::image_io::numbered_path;
///
/// assert_eq!(numbered_path(Path::new("out"), "sample", 42, "png"), Path::new("out/sample_00042.png"));
/// assert_eq!(numbered_path(Path::new("out"), "sample", 123456, ".png"), Path::new("out/sample_123456.png"));
/// ```
pub fn numbered_path(dir: &Path, prefix: &str, index: usize, ext: &str) -> PathBuf {
    let ext = ext.strip_prefix('.').unwrap_or(ext);
    dir.join(format!("{prefix}_{index:05}.{ext}"))
}

/// The path `dir/{prefix}_s{seed}_{index:06}.{ext}`, e.g. `sample_s7_000042.png`: the name of
/// image `index` of a run seeded `seed`, which with the per-image generator identifies the image
/// (its noise depends only on (seed, index)). Indices of 1000000 and up get more digits. `ext`
/// may be given with or without its leading dot.
///
/// ```
/// use std::path::Path;
/// use ddim::image_io::seeded_path;
///
/// assert_eq!(seeded_path(Path::new("out"), "sample", 7, 42, "png"), Path::new("out/sample_s7_000042.png"));
/// assert_eq!(seeded_path(Path::new("out"), "sample", 0, 1234567, ".png"), Path::new("out/sample_s0_1234567.png"));
/// ```
pub fn seeded_path(dir: &Path, prefix: &str, seed: u64, index: usize, ext: &str) -> PathBuf {
    let ext = ext.strip_prefix('.').unwrap_or(ext);
    dir.join(format!("{prefix}_s{seed}_{index:06}.{ext}"))
}

/// Creates `dir` if it is missing and checks that a file can be created in it, so that an
/// unusable output folder is reported (naming it) before any sampling work is done.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// ddim::image_io::ensure_writable_dir(&dir.path().join("a/b"))?;
/// assert!(dir.path().join("a/b").is_dir());
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tempfile::tempfile_in(dir).map_err(|e| {
        Error::io(
            dir,
            std::io::Error::new(e.kind(), format!("output directory is not writable: {e}")),
        )
    })?;
    Ok(())
}

/// The temporary files that interrupted writes of this module (a process killed while it wrote,
/// see [`save_png`]) left in `dir`, each with the name of the file it was for. They are hidden
/// and do not end in the target's extension; a caller that owns those targets may delete them.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join(".sample_s0_000003.png.Ab12cD.tmp"), b"half a PN").unwrap();
/// std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
/// let left = ddim::image_io::leftover_temp_files(dir.path())?;
/// assert_eq!(left.len(), 1);
/// assert_eq!(left[0].0, "sample_s0_000003.png");
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn leftover_temp_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if let Some(target) = name.to_str().and_then(crate::atomic::atomic_write_target) {
            found.push((target.to_string(), entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The first index that [`numbered_path`] can use in `dir` without overwriting anything: one
/// more than the largest index of an existing `{prefix}_{digits}.{ext}` file (gaps are not
/// reused, so the numbering always grows), or 0 if there is none. Other files are ignored; the
/// extension is compared ignoring ASCII case.
///
/// A missing `dir` is created; a `dir` that cannot be created or written to is an error naming it.
///
/// ```
/// use ddim::image_io::{next_free_index, numbered_path};
///
/// let dir = tempfile::tempdir().unwrap();
/// assert_eq!(next_free_index(dir.path(), "sample", "png")?, 0);
/// std::fs::write(numbered_path(dir.path(), "sample", 7, "png"), b"").unwrap();
/// assert_eq!(next_free_index(dir.path(), "sample", "png")?, 8);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn next_free_index(dir: &Path, prefix: &str, ext: &str) -> Result<usize> {
    let ext = ext.strip_prefix('.').unwrap_or(ext);
    ensure_writable_dir(dir)?;
    let mut next = 0usize;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(|n| parse_numbered(n, prefix, ext)) else {
            continue;
        };
        let after = index.checked_add(1).ok_or_else(|| {
            Error::argument(
                "dir",
                dir.display(),
                format!("no file numbered {index}, the largest index"),
            )
        })?;
        next = next.max(after);
    }
    Ok(next)
}

/// The index of a `{prefix}_{digits}.{ext}` file name; `None` for any other name (and for
/// indices too large for usize, which [`numbered_path`] never produces).
fn parse_numbered(name: &str, prefix: &str, ext: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('_')?;
    let dot = rest.len().checked_sub(ext.len() + 1)?;
    let (digits, suffix) = rest.split_at_checked(dot)?;
    if !suffix.starts_with('.') || !suffix[1..].eq_ignore_ascii_case(ext) {
        return None;
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, Rgb};

    fn tensor(values: &[f32], shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn pixel_conversion_matches_numpy() {
        // xs = np.array([-1.5, -1, -0.99, -0.5, 0, 0.001, 0.5, 0.99, 1, 1.5, np.inf, -np.inf], np.float32)
        // ((xs / 2 + 0.5).clip(0, 1) * 255).round().astype("uint8")
        let xs = [
            -1.5f32,
            -1.0,
            -0.99,
            -0.5,
            0.0,
            0.001,
            0.5,
            0.99,
            1.0,
            1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let want = [0u8, 0, 1, 64, 128, 128, 191, 254, 255, 255, 255, 0];
        let got: Vec<u8> = xs.iter().map(|&x| to_u8(x).unwrap()).collect();
        assert_eq!(got, want);
        // Exact .5 boundaries in f32, found with numpy: round half to even.
        // x = 0 -> 127.5 -> 128; -0.21176470816135406 -> 100.5 -> 100;
        // 0.9882352948188782 -> 253.5 -> 254; 0.9960784316062927 -> 254.5 -> 254.
        for (x, half, want) in [
            (0.0f32, 127.5f32, 128u8),
            (-0.211_764_71, 100.5, 100),
            (0.988_235_3, 253.5, 254),
            (0.996_078_43, 254.5, 254),
        ] {
            assert_eq!((x / 2.0 + 0.5) * 255.0, half, "{x} is not on a .5 boundary");
            assert_eq!(to_u8(x), Some(want), "{x}");
        }
        assert_eq!(to_u8(f32::NAN), None);
    }

    #[test]
    fn to_images_gray_rgb_and_bad_shapes() {
        // (2, 1, 1, 2) gray.
        let imgs = to_images(&tensor(&[-1.0, 1.0, 0.0, 0.5], (2, 1, 1, 2))).unwrap();
        assert_eq!(imgs.len(), 2);
        assert!(matches!(imgs[0], DynamicImage::ImageLuma8(_)));
        assert_eq!(imgs[0].to_luma8().into_raw(), vec![0, 255]);
        assert_eq!(imgs[1].to_luma8().into_raw(), vec![128, 191]);
        // (1, 3, 2, 1) RGB: channel planes become interleaved pixels.
        let imgs = to_images(&tensor(&[-1.0, 1.0, 1.0, -1.0, 0.0, 0.5], (1, 3, 2, 1))).unwrap();
        let rgb = imgs[0].to_rgb8();
        assert_eq!((rgb.width(), rgb.height()), (1, 2));
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([0, 255, 128]));
        assert_eq!(rgb.get_pixel(0, 1), &Rgb([255, 0, 191]));
        // Other dtypes are converted.
        let x = tensor(&[1.0], (1, 1, 1, 1)).to_dtype(DType::F16).unwrap();
        assert_eq!(to_images(&x).unwrap()[0].to_luma8().into_raw(), vec![255]);

        let e = to_images(&tensor(&[0.0; 8], (1, 2, 2, 2)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 channels"), "{e}");
        let e = to_images(&Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[3, 4]"), "{e}");
        let e = to_images(&tensor(&[0.0, f32::NAN], (1, 1, 1, 2)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NaN at (b, c, h, w) = (0, 0, 0, 1)"), "{e}");
    }

    #[test]
    fn every_byte_survives_from_image_then_to_images() {
        let gray = GrayImage::from_fn(16, 16, |x, y| Luma([(y * 16 + x) as u8]));
        let img = DynamicImage::ImageLuma8(gray.clone());
        let x = from_image(&img, 1, None).unwrap();
        assert_eq!(x.dims(), &[1, 1, 16, 16]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((v[0], v[255]), (-1.0, 1.0));
        assert_eq!(to_images(&x).unwrap()[0].to_luma8(), gray);
    }

    #[test]
    fn from_image_channels_and_resize() {
        let rgb = RgbImage::from_fn(4, 2, |x, _| Rgb([x as u8 * 60, 100, 200]));
        let img = DynamicImage::ImageRgb8(rgb.clone());
        let x = from_image(&img, 3, None).unwrap();
        assert_eq!(x.dims(), &[1, 3, 2, 4]);
        assert_eq!(to_images(&x).unwrap()[0].to_rgb8(), rgb);
        // PIL convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16; for (60, 100, 200):
        // python -c "from PIL import Image; print(Image.new('RGB', (1, 1), (60, 100, 200)).convert('L').getpixel((0, 0)))" -> 99
        let g = from_image(&img, 1, None).unwrap();
        assert_eq!(to_images(&g).unwrap()[0].to_luma8().get_pixel(1, 0).0, [99]);
        // Gray to RGB replicates.
        let gray = DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 2, Luma([77])));
        let x = from_image(&gray, 3, None).unwrap();
        assert_eq!(
            to_images(&x).unwrap()[0].to_rgb8().get_pixel(1, 1),
            &Rgb([77, 77, 77])
        );
        // Resize to (width, height); a constant image stays constant under Lanczos3.
        let x = from_image(&gray, 1, Some((5, 3))).unwrap();
        assert_eq!(x.dims(), &[1, 1, 3, 5]);
        assert!(to_images(&x).unwrap()[0]
            .to_luma8()
            .pixels()
            .all(|p| p.0 == [77]));
        assert!(from_image(&gray, 2, None)
            .unwrap_err()
            .to_string()
            .contains("channels"));
        assert!(from_image(&gray, 1, Some((0, 3)))
            .unwrap_err()
            .to_string()
            .contains("0x3"));
    }

    #[test]
    fn png_round_trip_and_load_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        // Values on the 8-bit grid: 2 * (p / 255) - 1 for bytes p.
        let data: Vec<f32> = (0..3 * 4 * 5)
            .map(|i| 2.0 * ((i * 4) as f32 / 255.0) - 1.0)
            .collect();
        let x = tensor(&data, (1, 3, 4, 5));
        save_png(&to_images(&x).unwrap()[0], &path).unwrap();
        let y = load_image(&path, 3, None).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), data);

        let e = load_image(&dir.path().join("none.png"), 3, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.png"), "{e}");
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not an image").unwrap();
        let e = load_image(&junk, 3, None).unwrap_err().to_string();
        assert!(e.contains("junk.png") && e.contains("decode"), "{e}");
    }

    #[test]
    fn grid_layout() {
        let imgs: Vec<_> = (0..5u8)
            .map(|i| DynamicImage::ImageLuma8(GrayImage::from_pixel(3, 2, Luma([i * 50 + 10]))))
            .collect();
        let grid = make_grid(&imgs, None, 1).unwrap();
        // ceil(sqrt(5)) = 3 columns, 2 rows.
        assert_eq!((grid.width(), grid.height()), (3 * 4 + 1, 2 * 3 + 1));
        assert!(matches!(grid, DynamicImage::ImageLuma8(_)));
        let g = grid.to_luma8();
        assert_eq!(g.get_pixel(0, 0).0, [0]); // padding
        assert_eq!(g.get_pixel(1, 1).0, [10]); // image 0
        assert_eq!(g.get_pixel(5, 1).0, [60]); // image 1
        assert_eq!(g.get_pixel(1, 4).0, [160]); // image 3, second row
        assert_eq!(g.get_pixel(9, 4).0, [0]); // empty sixth cell
        let grid = make_grid(&imgs, Some(5), 0).unwrap();
        assert_eq!((grid.width(), grid.height()), (15, 2));
        let grid = make_grid(&imgs, Some(99), 0).unwrap();
        assert_eq!(grid.width(), 15);
        assert_eq!(make_grid(&imgs[..4], None, 0).unwrap().dimensions(), (6, 4));
        assert_eq!(make_grid(&imgs[..1], None, 2).unwrap().dimensions(), (7, 6));
        // Mixed colour types give RGB; alpha gives RGBA.
        let mut mixed = imgs.clone();
        mixed.push(DynamicImage::ImageRgb8(RgbImage::new(3, 2)));
        assert!(matches!(
            make_grid(&mixed, None, 0).unwrap(),
            DynamicImage::ImageRgb8(_)
        ));
        mixed.push(DynamicImage::ImageRgba8(RgbaImage::new(3, 2)));
        assert!(matches!(
            make_grid(&mixed, None, 0).unwrap(),
            DynamicImage::ImageRgba8(_)
        ));

        assert!(make_grid(&[], None, 0).is_err());
        assert!(make_grid(&imgs, Some(0), 0).is_err());
        mixed.push(DynamicImage::ImageRgb8(RgbImage::new(4, 2)));
        let e = make_grid(&mixed, None, 0).unwrap_err().to_string();
        assert!(e.contains("image 7 of 4x2"), "{e}");
        let e = make_grid(&imgs, None, u32::MAX).unwrap_err().to_string();
        assert!(e.contains("padding"), "{e}");
    }

    #[test]
    fn upscale() {
        let img =
            DynamicImage::ImageRgb8(RgbImage::from_fn(2, 2, |x, y| Rgb([x as u8, y as u8, 9])));
        let big = upscale_nearest(&img, 4).unwrap();
        assert_eq!(big.dimensions(), (8, 8));
        let b = big.to_rgb8();
        for (x, y, p) in b.enumerate_pixels() {
            assert_eq!(p, &Rgb([(x / 4) as u8, (y / 4) as u8, 9]));
        }
        assert_eq!(upscale_nearest(&img, 1).unwrap(), img);
        assert!(upscale_nearest(&img, 0).is_err());
        assert!(upscale_nearest(&img, u32::MAX).is_err());
    }

    #[test]
    fn gif_frames_decode_back() {
        use image::AnimationDecoder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gif");
        let frames: Vec<_> = (0..4u8)
            .map(|i| DynamicImage::ImageLuma8(GrayImage::from_pixel(6, 5, Luma([i * 60]))))
            .collect();
        save_gif(&frames, &path, 80, true).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let decoded = image::codecs::gif::GifDecoder::new(file)
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap();
        assert_eq!(decoded.len(), 4);
        for (i, f) in decoded.iter().enumerate() {
            assert_eq!(f.buffer().dimensions(), (6, 5));
            let v = i as u8 * 60;
            assert_eq!(f.buffer().get_pixel(2, 2).0, [v, v, v, 255]);
            assert_eq!(f.delay().numer_denom_ms(), (80, 1));
        }
        save_gif(&frames[..1], &path, 10, false).unwrap();
        assert!(save_gif(&[], &path, 10, false).is_err());
        let mut bad = frames.clone();
        bad.push(DynamicImage::ImageLuma8(GrayImage::new(1, 1)));
        assert!(save_gif(&bad, &path, 10, true)
            .unwrap_err()
            .to_string()
            .contains("frame 4"));
    }

    #[test]
    fn atomic_save_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = DynamicImage::ImageRgb8(RgbImage::new(2, 2));
        // Target is a directory: the save fails, the directory and its content stay.
        let target = dir.path().join("out.png");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"k").unwrap();
        let e = save_png(&img, &target).unwrap_err().to_string();
        assert!(e.contains("out.png"), "{e}");
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"k");
        // An image PNG cannot hold fails before the old file is touched.
        let old = dir.path().join("old.png");
        save_png(&img, &old).unwrap();
        let before = std::fs::read(&old).unwrap();
        let float = DynamicImage::ImageRgba32F(image::Rgba32FImage::new(2, 2));
        if save_png(&float, &old).is_err() {
            assert_eq!(std::fs::read(&old).unwrap(), before);
        }
        // A parent that is a file cannot be a directory: error, nothing written.
        let file_parent = dir.path().join("old.png").join("x.png");
        assert!(save_png(&img, &file_parent).is_err());
        assert_eq!(std::fs::read(&old).unwrap(), before);
        // No temporary files are left behind.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("old.png"), "out.png".into()]
        );
    }

    #[test]
    fn numbering() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/out");
        assert_eq!(next_free_index(&out, "sample", "png").unwrap(), 0);
        assert!(out.is_dir());
        for name in [
            "sample_00000.png",
            "sample_00001.png",
            "sample_00005.PNG",
            "sample_00009.jpg",
            "sample_0001x.png",
            "sample_.png",
            "samples_00050.png",
            "other_00070.png",
            "sample_00100.png.tmp",
            "sample00200.png",
        ] {
            std::fs::write(out.join(name), b"").unwrap();
        }
        std::fs::create_dir(out.join("grid_00003.png")).unwrap();
        assert_eq!(next_free_index(&out, "sample", "png").unwrap(), 6);
        assert_eq!(next_free_index(&out, "sample", ".jpg").unwrap(), 10);
        assert_eq!(next_free_index(&out, "grid", "png").unwrap(), 4);
        std::fs::write(numbered_path(&out, "sample", 123456, "png"), b"").unwrap();
        assert_eq!(next_free_index(&out, "sample", "png").unwrap(), 123457);
        assert_eq!(
            numbered_path(&out, "sample", 0, "png"),
            out.join("sample_00000.png")
        );
        std::fs::write(out.join("sample_99999999999999999999999999.png"), b"").unwrap();
        assert_eq!(next_free_index(&out, "sample", "png").unwrap(), 123457);

        // A path under a regular file cannot be a directory.
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let e = next_free_index(&file.join("sub"), "sample", "png")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f/sub") || e.contains("f\\sub"), "{e}");
        let e = next_free_index(&file, "sample", "png")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&*file.to_string_lossy()), "{e}");
    }

    /// A read-only directory: the error names it and the old file stays. Skipped where the
    /// permission bits do not stop us (running as root).
    #[cfg(unix)]
    #[test]
    fn unwritable_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        let old = ro.join("sample_00000.png");
        let img = DynamicImage::ImageLuma8(GrayImage::new(2, 2));
        save_png(&img, &old).unwrap();
        let before = std::fs::read(&old).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let enforced = std::fs::write(ro.join("probe"), b"").is_err();
        if enforced {
            let e = next_free_index(&ro, "sample", "png")
                .unwrap_err()
                .to_string();
            assert!(e.contains("ro") && e.contains("not writable"), "{e}");
            let white = DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 2, Luma([255])));
            assert!(save_png(&white, &old).is_err());
            assert_eq!(std::fs::read(&old).unwrap(), before);
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn parse_numbered_names() {
        assert_eq!(
            parse_numbered("sample_00042.png", "sample", "png"),
            Some(42)
        );
        assert_eq!(parse_numbered("sample_7.png", "sample", "png"), Some(7));
        assert_eq!(parse_numbered("sample_.png", "sample", "png"), None);
        assert_eq!(parse_numbered("sample_12png", "sample", "png"), None);
        assert_eq!(parse_numbered("sample_1é.png", "sample", "png"), None);
        assert_eq!(parse_numbered("s.png", "sample", "png"), None);
    }
}
