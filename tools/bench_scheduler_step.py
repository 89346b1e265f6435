"""diffusers' DDIMScheduler.step / DDPMScheduler.step on a (16, 3, 256, 256) float32 CPU tensor,
to put next to `cargo bench -p ddim --bench scheduler_step` (same machine, same thread count).

    python tools/bench_scheduler_step.py --threads 2
"""

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler


def median_ms(fn, reps=30):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (16, 3, 256, 256)
    x, eps, z = (torch.randn(shape, generator=g) for _ in range(3))
    ddim = DDIMScheduler()
    ddim.set_timesteps(50)
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(50)
    t = torch.tensor(500)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {shape} float32")
    print(f"diffusers DDIMScheduler.step eta=0: {median_ms(lambda: ddim.step(eps, t, x, eta=0.0)):.2f} ms")
    print(f"diffusers DDIMScheduler.step eta=1: {median_ms(lambda: ddim.step(eps, t, x, eta=1.0, variance_noise=z)):.2f} ms")
    print(f"diffusers DDPMScheduler.step:       {median_ms(lambda: ddpm.step(eps, t, x, generator=g)):.2f} ms (includes drawing the noise)")


if __name__ == "__main__":
    main()
