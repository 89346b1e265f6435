#!/usr/bin/env python3
"""DDIM sampling speed and memory, ddim against diffusers (and ONNX Runtime), side by side.

One UNet of a hub config (random weights, made once by diffusers and saved as a pipeline folder
that both sides load), one DDIM run per implementation and batch size, each in its own process so
that its peak RSS is its own, model load included, the same number of threads:

    python tools/bench_vs_diffusers.py --threads 2 --batch 1,16 --steps 10 --rounds 5

- ddim: `target/release/ddim sample` (build it first: `cargo build --release`), with
  RAYON_NUM_THREADS set to --threads.
- diffusers: `DDIMPipeline.from_pretrained(...)(batch_size=B, num_inference_steps=S)` with
  torch.set_num_threads(--threads).
- ONNX Runtime (with --onnx; needs `pip install onnxruntime onnx`): the UNet exported by
  torch.onnx, run in an InferenceSession (intra-op threads = --threads) inside diffusers'
  DDIMScheduler loop.

Prints a table: wall time, image-steps per second, GFLOP/s (the UNet's FLOPs per image-step
counted by torch's FlopCounterMode), peak RSS, and each speed as a ratio of diffusers'. With
--rounds N each implementation runs N times per batch size, in turn (ours, diffusers, ONNX, ours,
...), so that a slow spell of the machine hits all of them; the table then holds medians and the
per-round step ratios follow it. Run it on
a quiet machine: nothing else may compete for the cores. Needs torch and diffusers in a
virtualenv outside the repository, and GNU time (`/usr/bin/time`, Debian package `time`).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(
    ROOT, "crates", "ddim", "tests", "fixtures", "hub-configs", "google--ddpm-cifar10-32")


def make_model(config_dir, out):
    """A pipeline folder with the config's UNet (random weights, seed 0) and a DDIM scheduler."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    with open(os.path.join(config_dir, "config.json")) as f:
        unet = UNet2DModel.from_config(json.load(f))
    with open(os.path.join(config_dir, "scheduler_config.json")) as f:
        scheduler = DDIMScheduler.from_config(json.load(f))
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    return unet


def gflop_per_image_step(unet):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c = unet.config.in_channels
    s = unet.config.sample_size
    s = s if isinstance(s, int) else s[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, c, s, s), torch.tensor([10]))
    return counter.get_total_flops() / 1e9


def run_child(cmd, env=None):
    """Runs cmd in its own process: (wall seconds, peak RSS in MiB, stdout and stderr).

    The peak RSS comes from GNU time (`/usr/bin/time`), which forks from its own small process:
    Linux carries a process's peak RSS across exec, so a child forked from this Python process,
    which holds torch, would report at least this process's size.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name] + cmd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}")
        rss_kib = int(rss_file.read().strip().splitlines()[-1])
    return wall, rss_kib / 1024, p.stdout


def diffusers_worker(args):
    import torch
    from diffusers import DDIMPipeline

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        pipe = DDIMPipeline.from_pretrained(args.worker_model)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        pipe(batch_size=args.worker_batch, num_inference_steps=args.steps,
             generator=torch.manual_seed(0), output_type="np")
        print(json.dumps({"sample_s": time.perf_counter() - t0}))


def onnx_worker(args):
    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import DDIMScheduler

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(args.worker_model, "unet.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    scheduler = DDIMScheduler.from_pretrained(args.worker_model, subfolder="scheduler")
    scheduler.set_timesteps(args.steps)
    with open(os.path.join(args.worker_model, "unet", "config.json")) as f:
        cfg = json.load(f)
    s = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    x = torch.randn(args.worker_batch, cfg["in_channels"], s, s, generator=torch.manual_seed(0))
    t0 = time.perf_counter()
    for t in scheduler.timesteps:
        eps = session.run(None, {"sample": x.numpy(),
                                 "timestep": np.full((args.worker_batch,), int(t), np.int64)})[0]
        x = scheduler.step(torch.from_numpy(eps), t, x).prev_sample
    print(json.dumps({"sample_s": time.perf_counter() - t0}))


def export_onnx(model_dir):
    import torch
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    c = unet.config.in_channels
    s = unet.config.sample_size
    s = s if isinstance(s, int) else s[0]

    class Wrap(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep):
            return self.unet(sample, timestep).sample

    torch.onnx.export(Wrap(unet), (torch.zeros(2, c, s, s), torch.tensor([1, 1])),
                      os.path.join(model_dir, "unet.onnx"), input_names=["sample", "timestep"],
                      output_names=["eps"], dynamic_axes={"sample": {0: "b"}, "timestep": {0: "b"}},
                      opset_version=17, dynamo=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a folder with config.json and "
                   "scheduler_config.json (default: google/ddpm-cifar10-32's)")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each implementation per batch size, taken in turn; the table "
                   "shows medians and the step ratios of each round follow it")
    p.add_argument("--ddim-dtype", default="f32", choices=["f32", "bf16"],
                   help="ddim's --dtype (bf16: bf16 products on CPUs with AVX512-BF16; the "
                   "others stay f32)")
    p.add_argument("--ddim", default=os.path.join(ROOT, "target", "release", "ddim"))
    p.add_argument("--worker", choices=["diffusers", "onnx"], help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be 1 or more")
    if args.worker == "diffusers":
        return diffusers_worker(args)
    if args.worker == "onnx":
        return onnx_worker(args)

    import diffusers
    import torch

    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        unet = make_model(args.config, model)
        gflop = gflop_per_image_step(unet)
        params = sum(p.numel() for p in unet.parameters())
        del unet
        if args.onnx:
            export_onnx(model)
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))

        def ours(b):
            # a fresh folder each run: ddim skips the images a folder already holds (resume)
            out = tempfile.mkdtemp(prefix=f"out{b}-", dir=tmp)
            wall, rss, text = run_child([args.ddim, "sample", "--model", model, "-n", str(b),
                                         "--batch-size", str(b), "--steps", str(args.steps),
                                         "--dtype", args.ddim_dtype, "--quiet", "--output",
                                         out], env)
            # "16 images x 10 steps in 28.57 s (...)": the sampling time, load excluded
            sample = float(re.search(r"steps in ([0-9.]+) s", text).group(1))
            return wall, rss, sample

        def worker(kind):
            def run(b):
                wall, rss, text = run_child([sys.executable, os.path.abspath(__file__),
                                             "--threads", str(args.threads), "--steps",
                                             str(args.steps), "--worker-model", model,
                                             "--worker-batch", str(b), "--worker", kind])
                return wall, rss, float(re.search(r'"sample_s": ([0-9.e-]+)', text).group(1))
            return run

        ours_name = "ddim" if args.ddim_dtype == "f32" else f"ddim ({args.ddim_dtype})"
        impls = [(ours_name, ours), (f"diffusers {diffusers.__version__}", worker("diffusers"))]
        if args.onnx:
            impls.append(("ONNX Runtime", worker("onnx")))
        rows, per_round = [], []
        for b in batches:
            # runs[i][r]: implementation i's (wall, rss, sample) in round r
            runs = [[] for _ in impls]
            for _ in range(args.rounds):
                for i, (_, run) in enumerate(impls):
                    runs[i].append(run(b))
            med = [tuple(statistics.median(col) for col in zip(*r)) for r in runs]
            base_wall, base_sample = med[1][0], med[1][2]
            for (name, _), (wall, rss, sample) in zip(impls, med):
                step = sample / args.steps
                rows.append((b, name, wall, b * args.steps / wall, step, b / step, rss,
                             base_wall / wall, base_sample / sample))
            if args.rounds > 1:
                ratios = lambda j: ", ".join(f"{t[2] / o[2]:.2f}" for o, t in zip(runs[0], runs[j]))
                per_round.append(f"batch {b}: {impls[0][0]} vs {impls[1][0]} {ratios(1)}" +
                                 (f"; vs {impls[2][0]} {ratios(2)}" if args.onnx else ""))

    print(f"DDIM sampling, {os.path.basename(os.path.normpath(args.config))} UNet "
          f"({params:,} parameters, {gflop:.1f} GFLOP per image-step), {args.threads} threads, "
          f"torch {torch.__version__}. 'Run' is a whole {args.steps}-step run with the model load "
          f"(and for Python the imports); 'step' is the sampling loop alone, per step, timed "
          f"inside each process." + (f" Medians of {args.rounds} rounds." if args.rounds > 1 else ""))
    print("| batch | implementation | run | image-steps/s (run) | step | image-steps/s (step) "
          "| GFLOP/s (step) | peak RSS | vs diffusers (run) | vs diffusers (step) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b, name, wall, ips, step, ips_step, rss, r_run, r_step in rows:
        print(f"| {b} | {name} | {wall:.2f} s | {ips:.2f} | {step * 1e3:.0f} ms | "
              f"{ips_step:.2f} | {ips_step * gflop:.0f} | {rss:.0f} MiB | {r_run:.2f}x "
              f"| {r_step:.2f}x |")
    if per_round:
        print("\nStep speed ratios, round by round (other's step time / ours):")
        for line in per_round:
            print(f"- {line}")


if __name__ == "__main__":
    sys.exit(main())
