"""What 20 MC-dropout samples cost: trunk-once stacking vs one forward pass vs naive replication.

Prints, in one run on this machine, for a batch of 8 radiograph-sized inputs:
  (1) one deterministic forward pass ``model(x)``,
  (2) ``bayesnet.mc_predict`` with T samples (trunk once, B x T stacked head rows), from one random stream and
      with per-image seeds as the service draws them (``input_seed`` + ``PerImageMasks``),
  (3) naive stacking: every image replicated T times through the whole network, as one (B*T) batch,
  (4) the same work as T separate full passes of the batch (the kinder naive baseline on a CPU, whose
      caches suffer from one huge batch),
and the ratios (2)/(1) (target <= 1.3) and (3)/(1), (4)/(1) (about T). Medians over repeats; the ratios, not the
absolute times, are the result on a shared, noisy machine.

    python bench/mc_cost.py [--arch efficientnet_b0] [--batch 8] [--size 224] [--samples 20] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds

from bayesnet import DropoutMasks, ModelSpec, PerImageMasks, build_model, input_seed, mc_predict, tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--naive-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tune_allocator()  # as the service, the archive scorer and train fit do at start-up (bayesnet/runtime.py)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=args.arch, image_size=args.size)).to(device)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    t = args.samples

    def forward() -> object:
        with torch.inference_mode():
            return model(x)

    def stacked() -> object:
        return mc_predict(model, x, t, generator)

    def seeded() -> object:
        # The service's draw: each image's seed from its input and the weights' digest, its masks from that seed.
        seeds = [input_seed(image, "0" * 64) for image in x]
        return mc_predict(model, x, t, masks=PerImageMasks(seeds, t))

    def naive() -> object:
        with torch.inference_mode():
            rows = x.repeat_interleave(t, dim=0)  # (B*T, 1, S, S): each image T times through everything
            return torch.sigmoid(model(rows, DropoutMasks(generator))).reshape(args.batch, t, -1).mean(1)

    def passes() -> object:
        with torch.inference_mode():
            probs = [torch.sigmoid(model(x, DropoutMasks(generator))) for _ in range(t)]
            return torch.stack(probs).mean(0)

    for fn in (forward, stacked, seeded, naive, passes):  # warm-up (allocator, kernels, thread pool)
        fn()
    one = median_seconds(forward, args.repeats, device)
    stream_runs, seeded_runs = [], []
    for _ in range(3):  # interleaved, the best of three each: the two differ by less than the machine's noise
        stream_runs.append(median_seconds(stacked, args.repeats, device))
        seeded_runs.append(median_seconds(seeded, args.repeats, device))
    mc, mc_seeded = min(stream_runs), min(seeded_runs)
    rep = median_seconds(naive, args.naive_repeats, device)
    sep = median_seconds(passes, args.naive_repeats, device)

    print(
        f"{args.arch}, batch {args.batch}, {args.size} px, T={t}, device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'method':<42}{'ms / batch':>12}{'x forward':>12}")
    print(f"{'one deterministic forward model(x)':<42}{one * 1e3:>12.1f}{1.0:>12.2f}")
    print(f"{'mc_predict (trunk once, stacked head)':<42}{mc * 1e3:>12.1f}{mc / one:>12.2f}")
    print(f"{'  with per-image seeds (the service)':<42}{mc_seeded * 1e3:>12.1f}{mc_seeded / one:>12.2f}")
    print(f"{'naive: each image x T in one batch':<42}{rep * 1e3:>12.1f}{rep / one:>12.2f}")
    print(f"{'naive: T separate full passes':<42}{sep * 1e3:>12.1f}{sep / one:>12.2f}")
    verdict = "PASS" if mc / one <= 1.3 else "FAIL"
    best_naive = min(rep, sep)
    print(
        f"target mc_predict <= 1.3 x forward: {verdict} ({mc / one:.2f}x); "
        f"best naive / mc_predict = {best_naive / mc:.1f}x"
    )
    print(
        f"per-image seeds (input digest + one generator per image) cost {(mc_seeded - mc) * 1e3 / args.batch:+.2f} ms "
        f"per image ({mc_seeded / mc:.3f}x the single-stream mc_predict)"
    )


if __name__ == "__main__":
    main()
