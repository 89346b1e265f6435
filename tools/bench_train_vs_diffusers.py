#!/usr/bin/env python3
"""Training step speed, ddim against diffusers, side by side in one run on one machine.

The step is the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py:
noise, DDPMScheduler.add_noise, UNet2DModel forward, MSE, backward, gradient clipping at 1,
AdamW (lr 1e-4, weight decay 1e-6, eps 1e-8), the lr scheduler, and diffusers' EMAModel step.
Both sides build the same UNet (ddim writes its preset's config.json; diffusers builds
UNet2DModel.from_config of it), use the same batch of the same images' shape, the same number of
threads, and report the median of the timed steps after two warm-up steps.

Needs torch and diffusers (a virtualenv outside the repository) and a release build of the
example: run from the repository root

    python tools/bench_train_vs_diffusers.py --threads 2 --batch 32 --steps 10

Run it on a quiet machine: nothing else may compete for the cores.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_ddim(args, config_path):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [
        "cargo", "run", "--release", "-q", "-p", "ddim", "--example", "train_bench", "--",
        args.preset, args.data, str(args.batch), str(args.steps), config_path,
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_diffusers(args, config_path):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(config_path) as f:
        config = json.load(f)
    model = UNet2DModel.from_config(config)
    model.train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=10_000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=0.75, model_cls=UNet2DModel, model_config=model.config)
    c, s = config["in_channels"], config["sample_size"]
    s = s if isinstance(s, int) else s[0]
    images = torch.rand(args.batch, c, s, s) * 2 - 1  # stands in for a data loader batch
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        noise = torch.randn(images.shape)
        t = torch.randint(0, 1000, (args.batch,)).long()
        noisy = scheduler.add_noise(images, noise, t)
        pred = model(noisy, t).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        if i >= 2:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "impl": "diffusers",
        "parameters": sum(p.numel() for p in model.parameters()),
        "median_step_s": median,
        "images_per_s": args.batch / median,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.json")
        ours = run_ddim(args, config_path)
        theirs = run_diffusers(args, config_path)
    import torch
    import diffusers
    assert ours["parameters"] == theirs["parameters"], (ours, theirs)
    print(f"training step, preset {args.preset} ({ours['parameters']:,} parameters), "
          f"batch {args.batch} of {'x'.join(map(str, ours['image']))}, {args.threads} threads, "
          f"median of {args.steps} steps")
    print(f"| implementation | step | images/s |")
    print(f"| --- | --- | --- |")
    print(f"| ddim | {ours['median_step_s'] * 1e3:.0f} ms | {ours['images_per_s']:.1f} |")
    print(f"| diffusers {diffusers.__version__}, torch {torch.__version__} | "
          f"{theirs['median_step_s'] * 1e3:.0f} ms | {theirs['images_per_s']:.1f} |")
    print(f"ddim / diffusers images/s: {ours['images_per_s'] / theirs['images_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
