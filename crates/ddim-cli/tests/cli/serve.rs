//! `ddim serve`: the page, the JSON API, streaming, cancelling, limits, bad requests and a clean
//! shutdown, driven over HTTP on a local port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::common::*;

/// A running `ddim serve` on a free port, stopped when dropped.
struct Server {
    child: Option<Child>,
    port: u16,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ddim"))
            .args(["serve", "--model", tiny_model(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = lines.next().unwrap().unwrap();
        let port = line
            .rsplit("http://127.0.0.1:")
            .next()
            .and_then(|rest| rest.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        // keep draining stderr so the server never blocks on it
        std::thread::spawn(move || for _ in lines {});
        Server {
            child: Some(child),
            port,
        }
    }

    fn connect(&self, path: &str) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        s
    }

    /// Status and (de-chunked) body of a GET.
    fn get(&self, path: &str) -> (u16, String) {
        Self::response(read_response(&mut self.connect(path)))
    }

    /// Status and body of a POST of `body` as JSON.
    fn post(&self, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        // (a server that refuses early may close before reading it all)
        let _ = s.write_all(body);
        Self::response(read_response(&mut s))
    }

    /// Status and body of a DELETE.
    fn get_delete(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "DELETE {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        Self::response(read_response(&mut s))
    }

    fn response(raw: Vec<u8>) -> (u16, String) {
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_string()
            },
        )
    }

    fn json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.get(path);
        (status, serde_json::from_str(&body).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP response, read to its end: Content-Length bytes, the last chunk, or the end of the
/// connection (some servers keep it open after `Connection: close`).
fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let k = s.read(&mut buf).unwrap_or(0);
        if k == 0 {
            return raw;
        }
        raw.extend_from_slice(&buf[..k]);
        let text = String::from_utf8_lossy(&raw);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = text[..end].to_ascii_lowercase();
        let length = head.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        let body = raw.len() - (end + 4);
        match length {
            Some(n) if body >= n => return raw,
            None if head.contains("transfer-encoding: chunked")
                && text[end..].ends_with("\r\n0\r\n\r\n") =>
            {
                return raw
            }
            _ => {}
        }
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The (event, data) pairs of a server-sent-event body.
fn events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            Some((name?, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

fn png_of(url: &serde_json::Value) -> image::RgbImage {
    let b64 = url
        .as_str()
        .unwrap()
        .strip_prefix("data:image/png;base64,")
        .unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

#[test]
fn serve_streams_every_step_and_gives_the_cli_images() {
    let server = Server::start(&[]);
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<html") && page.contains("ddim playground"));
    let (status, info) = server.json("/api/info");
    assert_eq!(status, 200);
    assert_eq!(
        info["image"],
        serde_json::json!({"channels": 3, "height": 8, "width": 8})
    );
    assert!(info["samplers"]
        .as_array()
        .unwrap()
        .contains(&"dpm++2m".into()));
    let (status, body) = server.get("/api/sample?steps=3&n=2&seed=1");
    assert_eq!(status, 200);
    let ev = events(&body);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["step", "step", "step", "done"]);
    for (i, (_, data)) in ev[..3].iter().enumerate() {
        assert_eq!(data["index"], i);
        assert_eq!(data["num_steps"], 3);
        assert_eq!(data["x0"].as_array().unwrap().len(), 2);
        assert_eq!(data["xt"].as_array().unwrap().len(), 2);
    }
    // the same images as `ddim sample` with that seed
    let dir = tmp("serve-cli");
    let o = ddim(&[
        "sample",
        "--model",
        tiny_model(),
        "--steps",
        "3",
        "-n",
        "2",
        "--seed",
        "1",
        "-q",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let images = ev[3].1["images"].as_array().unwrap();
    for (i, url) in images.iter().enumerate() {
        let cli = image::open(dir.join(format!("sample_s1_{i:06}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(png_of(url), cli, "image {i}");
    }
    // the last step's x_t is the result
    assert_eq!(ev[2].1["xt"], ev[3].1["images"]);
    // another sampler streams its own steps
    let (status, body) = server.get("/api/sample?sampler=heun&steps=2&n=1");
    assert_eq!(status, 200);
    assert_eq!(
        events(&body).len(),
        3 + 1,
        "Heun: 2 · 2 - 1 calls, then done"
    );
}

#[test]
fn serve_refuses_bad_requests_with_json_naming_the_field() {
    let server = Server::start(&["--max-images", "4", "--max-steps", "100"]);
    for (query, field) in [
        ("steps=0", "steps"),
        ("steps=101", "steps"),
        ("steps=ten", "steps"),
        ("n=5", "n"),
        ("n=-1", "n"),
        ("eta=-0.5", "eta"),
        ("eta=nan", "eta"),
        ("seed=x", "seed"),
        ("sampler=nope", "sampler"),
        ("colour=red", "colour"),
    ] {
        let (status, e) = server.json(&format!("/api/sample?{query}"));
        assert_eq!(status, 400, "{query}: {e}");
        assert_eq!(e["field"], field, "{query}: {e}");
        assert!(!e["error"].as_str().unwrap().is_empty());
    }
    let (status, e) = server.json("/nothing/here");
    assert_eq!(status, 404);
    assert!(e["error"].as_str().unwrap().contains("/api/sample"));
    // nothing was started
    let (_, info) = server.json("/api/info");
    assert_eq!(info["jobs"]["started"], 0);
}

#[test]
fn serve_cancels_a_run_whose_client_leaves_and_limits_the_queue() {
    let server = Server::start(&["--max-queue", "1"]);
    let mut long = server.connect("/api/sample?steps=1000&n=16");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: step") {
        let k = long.read(&mut buf).unwrap();
        assert!(k > 0, "the stream ended before a step");
        seen.extend_from_slice(&buf[..k]);
    }
    // the queue holds one run: a second is refused while the first runs
    let (status, e) = server.json("/api/sample?steps=2&n=1");
    assert_eq!(status, 429, "{e}");
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, info) = server.json("/api/info");
        if info["jobs"]["cancelled"] == 1 && info["jobs"]["waiting_or_running"] == 0 {
            assert_eq!(info["jobs"]["finished"], 0, "{info}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run was not cancelled: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = server.get("/api/sample?steps=2&n=1");
    assert_eq!(status, 200);
    assert_eq!(events(&body).last().unwrap().0, "done");
}

#[cfg(unix)]
#[test]
fn serve_stops_cleanly_on_sigint_and_refuses_bad_flags() {
    let mut server = Server::start(&[]);
    let (status, _) = server.get("/api/info");
    assert_eq!(status, 200);
    let child = server.child.take().unwrap();
    let o = interrupt(child);
    assert_eq!(o.status.code(), Some(0));
    for (flags, needle) in [
        (&["--max-images", "0"][..], "--max-images 0"),
        (&["--host", "not a host!"][..], "--host"),
    ] {
        let o = ddim(&[&["serve", "--model", tiny_model()][..], flags].concat());
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{flags:?}: {}", stderr(&o));
    }
}

/// `POST /api/sample` with an init image: SDEdit, the images of `ddim sample --init`; bad
/// bodies and images get 400 (413 past the body limit) naming the field.
#[test]
fn serve_sdedit_from_a_posted_image_matches_the_cli() {
    let server = Server::start(&[]);
    let dir = tmp("serve-sdedit");
    let init = dir.join("init.png");
    image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 99])
    })
    .save(&init)
    .unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&init).unwrap())
    );
    let body = serde_json::json!({
        "steps": 10, "n": 2, "seed": 4, "init": url, "strength": 0.5, "sampler": "ddim"
    });
    let (status, text) = server.post("/api/sample", body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let ev = events(&text);
    assert_eq!(ev.len(), 5 + 1, "int(10 × 0.5) steps, then done");
    let o = ddim(&[
        "sample",
        "--model",
        tiny_model(),
        "--init",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "10",
        "-n",
        "2",
        "--seed",
        "4",
        "-q",
        "-o",
        dir.join("cli").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (i, url) in ev[5].1["images"].as_array().unwrap().iter().enumerate() {
        let cli = image::open(dir.join(format!("cli/sample_s4_{i:06}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(png_of(url), cli, "image {i}");
    }
    for (body, field) in [
        (
            r#"{"steps": 10, "init": "data:image/png;base64,AAAA"}"#.to_string(),
            "init",
        ),
        (
            r#"{"init": "http://example.com/x.png"}"#.to_string(),
            "init",
        ),
        (format!(r#"{{"init": "{url}", "strength": 0}}"#), "strength"),
        (
            format!(r#"{{"init": "{url}", "sampler": "euler"}}"#),
            "sampler",
        ),
        (r#"{"strength": 0.5}"#.to_string(), "strength"),
        ("[1, 2]".to_string(), "body"),
        ("{not json".to_string(), "body"),
    ] {
        let (status, text) = server.post("/api/sample", body.as_bytes());
        assert_eq!(status, 400, "{body}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    let huge = format!(r#"{{"init": "{}"}}"#, "A".repeat(2 << 20));
    let (status, _) = server.post("/api/sample", huge.as_bytes());
    assert_eq!(status, 413);
}

/// `POST /api/invert` gives an image's x_T; sampling from it (`noise`) at η = 0 and the same
/// steps decodes the image as `ddim invert --reconstruct` does.
#[test]
fn serve_inverts_an_image_and_decodes_its_noise() {
    let server = Server::start(&[]);
    let dir = tmp("serve-invert");
    let img = dir.join("x.png");
    image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 31) as u8, 200, (y * 29) as u8])
    })
    .save(&img)
    .unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&img).unwrap())
    );
    let (status, text) = server.post(
        "/api/invert",
        serde_json::json!({"image": url, "steps": 6})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let inv: serde_json::Value = serde_json::from_str(&text).unwrap();
    let x_t = inv["x_t"].as_str().unwrap().to_string();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&x_t)
            .unwrap()
            .len(),
        3 * 8 * 8 * 4
    );
    png_of(&inv["x_t_image"]);
    let (status, text) = server.post(
        "/api/sample",
        serde_json::json!({"noise": x_t, "steps": 6})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let ev = events(&text);
    let done = &ev.last().unwrap().1;
    let rec = dir.join("rec.png");
    let o = ddim(&[
        "invert",
        "--model",
        tiny_model(),
        "-i",
        img.to_str().unwrap(),
        "--steps",
        "6",
        "--save-tensor",
        dir.join("x.npy").to_str().unwrap(),
        "--reconstruct",
        rec.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        png_of(&done["images"][0]),
        image::open(&rec).unwrap().to_rgb8()
    );
    for (body, field) in [
        (serde_json::json!({"noise": "AAAA"}), "noise"),
        (serde_json::json!({"noise": x_t, "n": 2}), "n"),
        (serde_json::json!({"noise": x_t, "init": url}), "noise"),
    ] {
        let (status, text) = server.post("/api/sample", body.to_string().as_bytes());
        assert_eq!(status, 400, "{body}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    for (body, field) in [
        (
            serde_json::json!({"image": "data:image/png;base64,AAAA"}),
            "image",
        ),
        (serde_json::json!({"steps": 5}), "image"),
        (serde_json::json!({"image": url, "steps": 0}), "steps"),
        (serde_json::json!({"image": url, "eta": 1}), "eta"),
    ] {
        let (status, text) = server.post("/api/invert", body.to_string().as_bytes());
        assert_eq!(status, 400, "{body}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["field"], field, "{body}: {e}");
    }
}

/// `POST /api/interpolate` gives the frames of `ddim interpolate --image-a --image-b`.
#[test]
fn serve_interpolates_between_two_images_as_the_cli_does() {
    let server = Server::start(&[]);
    let dir = tmp("serve-interp");
    let mut urls = Vec::new();
    for (k, name) in ["a.png", "b.png"].iter().enumerate() {
        image::RgbImage::from_fn(8, 8, |x, y| {
            let v = ((x * 23 + y * 41 + k as u32 * 97) % 256) as u8;
            image::Rgb([v, 128, 255 - v])
        })
        .save(dir.join(name))
        .unwrap();
        urls.push(format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(dir.join(name)).unwrap())
        ));
    }
    let body = serde_json::json!({"a": urls[0], "b": urls[1], "steps": 6, "frames": 4});
    let (status, text) = server.post("/api/interpolate", body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let got: serde_json::Value = serde_json::from_str(&text).unwrap();
    let frames = got["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 4);
    let strip = dir.join("strip.png");
    let o = ddim(&[
        "interpolate",
        "--model",
        tiny_model(),
        "--image-a",
        dir.join("a.png").to_str().unwrap(),
        "--image-b",
        dir.join("b.png").to_str().unwrap(),
        "--steps",
        "6",
        "--frames",
        "4",
        "-q",
        "-o",
        strip.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let grid = image::open(&strip).unwrap().to_rgb8();
    for (k, url) in frames.iter().enumerate() {
        let frame = png_of(url);
        for (x, y, p) in frame.enumerate_pixels() {
            assert_eq!(grid.get_pixel(2 + k as u32 * 10 + x, 2 + y), p, "frame {k}");
        }
    }
    for (body, field) in [
        (serde_json::json!({"a": urls[0]}), "b"),
        (
            serde_json::json!({"a": urls[0], "b": urls[1], "frames": 1}),
            "frames",
        ),
        (
            serde_json::json!({"a": urls[0], "b": urls[1], "frames": 1000}),
            "frames",
        ),
        (serde_json::json!({"a": urls[0], "b": "x", "steps": 3}), "b"),
        (
            serde_json::json!({"a": urls[0], "b": urls[1], "seed": 3}),
            "seed",
        ),
    ] {
        let (status, text) = server.post("/api/interpolate", body.to_string().as_bytes());
        assert_eq!(status, 400, "{body}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["field"], field, "{body}: {e}");
    }
}

/// The server's resident memory in KiB (Linux).
#[cfg(target_os = "linux")]
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A bounded load: 8 clients × 6 rounds of runs (some left half-way; every other round meets a
/// queue already full) on localhost. Every answer is a finished stream or a 429, the counters add up, and the memory
/// after the last round is where it was after the first (no leak per run). Prints the figures.
#[cfg(target_os = "linux")]
#[test]
fn serve_holds_its_limits_under_load_and_does_not_leak() {
    let server = Server::start(&["--max-queue", "3", "--max-images", "4"]);
    let pid = server.child.as_ref().unwrap().id();
    let (clients, rounds) = (8usize, 6usize);
    let started = Instant::now();
    let mut rss = Vec::new();
    let (mut done, mut refused, mut left) = (0, 0, 0);
    for round in 0..rounds {
        // every other round starts with the queue full: one long run past its first step and
        // two waiting for it
        let holders: Vec<TcpStream> = if round % 2 == 0 {
            let mut first = server.connect("/api/sample?steps=1000&n=4");
            let mut buf = [0u8; 1024];
            let mut seen = String::new();
            while !seen.contains("event: step") {
                let k = first.read(&mut buf).unwrap();
                assert!(k > 0);
                seen.push_str(&String::from_utf8_lossy(&buf[..k]));
            }
            let mut all = vec![first];
            all.extend((0..2).map(|_| server.connect("/api/sample?steps=1000&n=4")));
            let deadline = Instant::now() + Duration::from_secs(60);
            while server.json("/api/info").1["jobs"]["waiting_or_running"] != 3 {
                assert!(Instant::now() < deadline, "the queue did not fill");
                std::thread::sleep(Duration::from_millis(5));
            }
            all
        } else {
            Vec::new()
        };
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let port = server.port;
                std::thread::spawn(move || {
                    let probe = Server { child: None, port };
                    if c % 4 == 3 {
                        // leaves after the first step
                        let mut s = probe.connect("/api/sample?steps=200&n=4");
                        let mut buf = [0u8; 1024];
                        let k = s.read(&mut buf).unwrap();
                        let head = String::from_utf8_lossy(&buf[..k]).to_string();
                        return if head.contains(" 429 ") { 1 } else { 2 };
                    }
                    let (status, body) =
                        probe.get(&format!("/api/sample?steps=8&n=4&seed={}", round * 8 + c));
                    match status {
                        200 => {
                            assert_eq!(events(&body).last().unwrap().0, "done");
                            0
                        }
                        429 => 1,
                        other => panic!("status {other}: {body}"),
                    }
                })
            })
            .collect();
        for h in handles {
            match h.join().unwrap() {
                0 => done += 1,
                1 => refused += 1,
                _ => left += 1,
            }
        }
        left += holders.len();
        drop(holders);
        // every run of the round has ended (the cancelled ones within their next step)
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, info) = server.json("/api/info");
            if info["jobs"]["waiting_or_running"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "runs still going: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
        rss.push(rss_kib(pid));
    }
    let seconds = started.elapsed().as_secs_f64();
    let (_, info) = server.json("/api/info");
    let jobs = &info["jobs"];
    let n = |k: &str| jobs[k].as_u64().unwrap();
    assert_eq!(
        n("started"),
        n("finished") + n("cancelled") + n("failed"),
        "{info}"
    );
    assert_eq!(n("failed"), 0, "{info}");
    // (a run whose client left may still have finished before it noticed)
    assert!(n("finished") >= done as u64, "{info}");
    assert_eq!(
        done + refused + left,
        clients * rounds + 3 * rounds.div_ceil(2)
    );
    // clients that met a full queue were refused; in the other rounds some ran
    assert!(refused > 0, "{refused} refused");
    assert!(done > 0, "{info}");
    let growth = rss[rss.len() - 1] as i64 - rss[0] as i64;
    println!(
        "load: {clients} clients × {rounds} rounds in {seconds:.1} s: {done} runs finished, \
         {refused} refused (429), {left} left half-way; RSS after each round (KiB): {rss:?}"
    );
    assert!(growth < 16 * 1024, "RSS grew {growth} KiB: {rss:?}");
}

/// A WebDriver session of chromedriver (W3C protocol over HTTP).
struct Browser {
    driver: Server,
    session: String,
}

impl Browser {
    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, text) = match method {
            "GET" => self.driver.get(&path),
            _ => self.driver.post(&path, body.to_string().as_bytes()),
        };
        assert_eq!(status, 200, "{method} {path}: {text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["value"].clone()
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            serde_json::json!({"using": "css selector", "value": css}),
        );
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn script(&self, js: &str) -> serde_json::Value {
        self.call(
            "POST",
            "/execute/sync",
            serde_json::json!({"script": js, "args": []}),
        )
    }

    fn wait_for(&self, js: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.script(js) != serde_json::Value::Bool(true) {
            let status = self.script("return document.getElementById('status').textContent");
            assert!(Instant::now() < deadline, "{what}; the page says {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The page in headless Chromium (Debian's chromium + chromium-driver, which `.ci/run`
/// installs): it loads the samplers, samples with previews updating step by step, draws on the
/// pad and inverts the drawing. `DDIM_SERVE_SCREENSHOT=FILE` saves a screenshot there (the
/// README's docs/serve.png). Without chromedriver on PATH the test says so and does nothing.
#[test]
fn serve_page_works_in_headless_chromium() {
    let found = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if !found("chromedriver") || !found("chromium") {
        eprintln!("SKIPPED: chromedriver and chromium are not on PATH (.ci/run installs them)");
        return;
    }
    let server = Server::start(&[]);
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Server {
        child: Some(child),
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,700"]
        }
    }}});
    let (status, text) = driver.post("/session", caps.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let session = serde_json::from_str::<serde_json::Value>(&text).unwrap()["value"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let b = Browser { driver, session };
    b.call(
        "POST",
        "/url",
        serde_json::json!({"url": format!("http://127.0.0.1:{}/", server.port)}),
    );
    b.wait_for(
        "return document.getElementById('sampler').options.length > 5",
        "the samplers did not load",
    );
    for (id, value) in [("steps", "12"), ("n", "8")] {
        let e = b.element(&format!("#{id}"));
        b.call(
            "POST",
            &format!("/element/{e}/clear"),
            serde_json::json!({}),
        );
        b.call(
            "POST",
            &format!("/element/{e}/value"),
            serde_json::json!({"text": value}),
        );
    }
    let go = b.element("#go");
    b.call(
        "POST",
        &format!("/element/{go}/click"),
        serde_json::json!({}),
    );
    b.wait_for(
        "return document.body.dataset.done === '1'",
        "the run did not finish",
    );
    // the previews changed at every step, and the final images are shown
    assert_eq!(b.script("return Number(document.body.dataset.steps)"), 12);
    assert_eq!(
        b.script("return document.querySelectorAll('#x0 img').length"),
        8
    );
    // draw a stroke on the pad, invert it
    let pad = b.element("#pad");
    let origin = serde_json::json!({"element-6066-11e4-a52e-4f735466cecf": pad});
    b.call(
        "POST",
        "/actions",
        serde_json::json!({"actions": [{"type": "pointer", "id": "pen",
            "parameters": {"pointerType": "mouse"}, "actions": [
            {"type": "pointerMove", "origin": origin, "x": -30, "y": -40},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerMove", "origin": origin, "x": 0, "y": 40, "duration": 100},
            {"type": "pointerMove", "origin": origin, "x": 30, "y": -40, "duration": 100},
            {"type": "pointerUp", "button": 0}]}]}),
    );
    let lit = b.script(
        "const c = document.getElementById('pad').getContext('2d');\
         const d = c.getImageData(0, 0, 168, 168).data; let n = 0;\
         for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++; return n",
    );
    assert!(lit.as_u64().unwrap() > 100, "the stroke drew {lit} pixels");
    let invert = b.element("#invert");
    b.call(
        "POST",
        &format!("/element/{invert}/click"),
        serde_json::json!({}),
    );
    b.wait_for(
        "return !document.getElementById('inverted').hidden",
        "the drawing was not inverted",
    );
    if let Some(path) = std::env::var_os("DDIM_SERVE_SCREENSHOT") {
        let shot = b.call("GET", "/screenshot", serde_json::json!({}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
    let (status, _) = b.driver.get_delete(&format!("/session/{}", b.session));
    assert_eq!(status, 200);
}

/// `POST /api/inpaint` gives the repaintings of `ddim inpaint`; a walk past the limit is refused.
#[test]
fn serve_inpaints_as_the_cli_does() {
    let server = Server::start(&[]);
    let dir = tmp("serve-inpaint");
    let img = dir.join("x.png");
    let mask = dir.join("m.png");
    image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 77])
    })
    .save(&img)
    .unwrap();
    image::GrayImage::from_fn(8, 8, |_, y| image::Luma([if y < 5 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let url = |p: &std::path::Path| {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
        )
    };
    let body = serde_json::json!({"image": url(&img), "mask": url(&mask), "steps": 10,
        "jump_length": 3, "jump_n_sample": 2, "seed": 5, "n": 2});
    let (status, text) = server.post("/api/inpaint", body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let got: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got["walk"], 28);
    let out = dir.join("cli.png");
    let o = ddim(&[
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
        "--seed",
        "5",
        "-n",
        "2",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let row = image::open(&out).unwrap().to_rgb8();
    for (k, url) in got["images"].as_array().unwrap().iter().enumerate() {
        for (x, y, p) in png_of(url).enumerate_pixels() {
            assert_eq!(row.get_pixel(2 + k as u32 * 10 + x, 2 + y), p, "image {k}");
        }
    }
    for (body, field) in [
        (serde_json::json!({"image": url(&img)}), "mask"),
        (
            serde_json::json!({"image": url(&img), "mask": url(&mask), "steps": 250,
            "jump_n_sample": 100}),
            "jump_n_sample",
        ),
        (
            serde_json::json!({"image": url(&img), "mask": url(&mask), "eta": -1}),
            "eta",
        ),
        (
            serde_json::json!({"image": url(&img), "mask": url(&mask), "n": 99}),
            "n",
        ),
    ] {
        let (status, text) = server.post("/api/inpaint", body.to_string().as_bytes());
        assert_eq!(status, 400, "{text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["field"], field, "{e}");
    }
}
