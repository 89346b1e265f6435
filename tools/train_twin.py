#!/usr/bin/env python3
"""A twin of a `ddim train` run, trained by diffusers + PyTorch: the same UNet config, data,
noise schedule, objective, batch size, learning rate and schedule, AdamW settings, gradient
clipping, EMA and number of steps, in the loop of diffusers'
examples/unconditional_image_generation/train_unconditional.py. It saves a diffusers pipeline
folder (the EMA weights + the DDPM scheduler config) that `ddim eval --model` and diffusers'
`DDIMPipeline.from_pretrained` load, so the two runs are scored the same way.

What differs by design: the random draws (PyTorch's generator, not ddim's streams) and the
initial weights (PyTorch's default initialisation, of the same distribution as ddim's).

The recipe is read from a ddim run folder (`training_state.safetensors` keeps the run's config),
so the twin cannot drift from it:

    python tools/train_twin.py --like runs/mnist --output runs/mnist-twin [--device cuda]

or given in flags (the built-in model's recipe shown):

    python tools/train_twin.py --unet-config runs/mnist/unet/config.json --data mnist5k \\
        --batch-size 32 --lr 1e-3 --lr-schedule constant --warmup-steps 100 --ema-decay 0.999 \\
        --steps 6780 --output runs/mnist-twin

`--save-every K` writes the pipeline every K steps and keeps a copy per checkpoint under
`OUTPUT/checkpoints/step_XXXXXX/` (for FD against training steps); `--resume` continues from
`OUTPUT/twin_state.pt`. Needs torch, diffusers and pillow (a virtualenv outside the repository).
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SETS = {  # name -> (sprite sheet, tile size): see tools/datasets.py
    "mnist5k": ("crates/ddim/assets/mnist5k.png", 28),
    "digits": ("crates/ddim/assets/digits.png", 8),
}


def load_set(name):
    path, size = SETS[name]
    sheet = np.asarray(Image.open(os.path.join(ROOT, path)).convert("L"), dtype=np.float32)
    labels = open(os.path.join(ROOT, path.replace(".png", "-labels.txt"))).read().strip()
    cols = sheet.shape[1] // size
    tiles = [sheet[(i // cols) * size:(i // cols + 1) * size, (i % cols) * size:(i % cols + 1) * size]
             for i in range(len(labels))]
    # model space, as ddim's Dataset: v / 127.5 - 1
    return torch.from_numpy(np.stack(tiles)[:, None] / 127.5 - 1.0)


def ddim_run_config(folder):
    """The run config a ddim checkpoint keeps in its safetensors metadata."""
    with open(os.path.join(folder, "training_state.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.get("__metadata__", {})
    for value in meta.values():
        try:
            cfg = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(cfg, dict) and "unet" in cfg and "scheduler" in cfg:
            return cfg
    sys.exit(f"{folder}: no run config in training_state.safetensors")


def lr_at(step, peak, warmup, total, schedule):
    """diffusers' get_scheduler('constant_with_warmup' / 'cosine') at optimisation step `step`."""
    if step < warmup:
        return peak * step / max(1, warmup)
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_pipeline(out, unet_config, ema_model, scheduler_config):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unet = UNet2DModel.from_config(unet_config)
    unet.load_state_dict(ema_model.state_dict())
    scheduler = DDPMScheduler.from_config(scheduler_config)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", help="a ddim train output folder whose recipe to copy")
    p.add_argument("--unet-config")
    p.add_argument("--data", default="mnist5k", choices=sorted(SETS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    p.add_argument("--steps", type=int, help="total steps (default: the --like run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    args = p.parse_args()

    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    if args.threads:
        torch.set_num_threads(args.threads)
    adam = dict(betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6)
    max_grad_norm = 1.0
    ema_kw = dict(inv_gamma=1.0, power=0.75)
    if args.like:
        run = ddim_run_config(args.like)
        unet_config = run["unet"]
        scheduler_config = run["scheduler"]
        args.batch_size, args.lr = run["batch_size"], run["lr"]
        args.lr_schedule, args.warmup_steps = run["lr_scheduler"], run["lr_warmup_steps"]
        args.ema_decay = run["ema_max_decay"]
        adam = dict(betas=(run["adam_beta1"], run["adam_beta2"]), eps=run["adam_epsilon"],
                    weight_decay=run["adam_weight_decay"])
        max_grad_norm = run["max_grad_norm"]
        if run["ema"] != "warmup":
            sys.exit("the twin implements diffusers' EMA warmup only")
        ema_kw = dict(inv_gamma=run["ema_inv_gamma"], power=run["ema_power"])
        if args.steps is None:
            args.steps = run["steps"]
        if run.get("random_flip"):
            sys.exit("the twin does not flip images")
    else:
        if not args.unet_config:
            sys.exit("give --like RUN or --unet-config")
        with open(args.unet_config) as f:
            unet_config = json.load(f)
        scheduler_config = dict(num_train_timesteps=1000, beta_schedule="linear",
                                beta_start=1e-4, beta_end=0.02, prediction_type=args.prediction_type)
    if args.steps is None:
        sys.exit("give --steps")

    device = torch.device(args.device)
    data = load_set(args.data).to(device)
    torch.manual_seed(args.seed)
    model = UNet2DModel.from_config(unet_config).to(device).train()
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    prediction_type = noise_scheduler.config.prediction_type
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, **adam)
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, **ema_kw)
    ema.to(device)
    losses = []
    step = 0
    state_path = os.path.join(args.output, "twin_state.pt")
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        losses, step = state["losses"], state["step"]
        torch.set_rng_state(state["rng"])
    elif os.path.exists(state_path):
        sys.exit(f"{args.output} holds a twin run already: pass --resume, or another --output")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "twin_recipe.json"), "w") as f:
        json.dump(dict(vars(args), adam=adam, max_grad_norm=max_grad_norm, ema=ema_kw,
                       unet=unet_config, scheduler=scheduler_config), f, indent=1)


    def checkpoint():
        ema_model = UNet2DModel.from_config(unet_config)
        ema.copy_to(ema_model.parameters())
        save_pipeline(args.output, unet_config, ema_model, scheduler_config)
        keep = os.path.join(args.output, "checkpoints", f"step_{step:06}")
        shutil.rmtree(keep, ignore_errors=True)
        save_pipeline(keep, unet_config, ema_model, scheduler_config)
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), ema=ema.state_dict(),
                        losses=losses, step=step, rng=torch.get_rng_state()), state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)
        window = losses[-args.save_every:]
        print(f"step {step}/{args.steps}: mean loss of the last {len(window)} steps "
              f"{sum(window) / max(1, len(window)):.4f}, {time.time() - t0:.0f}s", flush=True)

    n = data.shape[0]
    t0 = time.time()
    order, epoch = None, -1
    while step < args.steps:
        # one permutation per epoch, batches taken in order across epoch boundaries (as ddim)
        idx = []
        for pos in range(step * args.batch_size, (step + 1) * args.batch_size):
            if pos // n != epoch:
                epoch = pos // n
                order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
            idx.append(int(order[pos % n]))
        x0 = data[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), device=device)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup_steps, args.steps, args.lr_schedule)
        loss = F.mse_loss(model(x_t, t).sample.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        ema.step(model.parameters())
        losses.append(loss.item())
        step += 1
        if step % args.save_every == 0 or step == args.steps:
            checkpoint()


if __name__ == "__main__":
    main()
