"""What reduced precision does to the answers: fp16 and bf16 autocast against fp32, on real radiographs.

For each precision, on one device, the same films and the same MC seed:
  * the deterministic forward: max and mean |p - p_fp32| of the calibrated probabilities;
  * the service's MC prediction (T samples, ``bayesnet.mc_predict``): max and mean |conf - conf_fp32| and how
    many (film, finding) decisions change (positive / negative / uncertain, the spec's rule);
  * images/s of the deterministic forward at the batch size given.
A row "fp32, other seed" gives the scale of MC noise alone, to read the precision rows against.

    python bench/precision.py [--model models/demo] [--device cuda|cpu] [--images DIR] [--n 64] [--batch 32]

Films: ``--images`` (PNG/JPEG/DICOM files), else the NIH sample in ../shared when present, else synthetic.
This is how ``CXR_AUTOCAST=auto`` was chosen (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bayesnet import decide, decode_image, load_checkpoint, mc_predict, preprocess  # noqa: E402
from bayesnet.spec import ModelSpec  # noqa: E402

SHARED_FILMS = REPO.parent / "shared" / "data" / "nih-cxr14-sample" / "images"


def films(source: Path | None, n: int, spec: ModelSpec) -> tuple[torch.Tensor, str]:
    folder = source or (SHARED_FILMS if SHARED_FILMS.is_dir() else None)
    if folder is not None:
        paths = sorted(p for p in folder.iterdir() if p.is_file())[:n]
        tensors = [preprocess(decode_image(p.read_bytes()).pixels, spec) for p in paths]
        return torch.stack(tensors), f"{len(paths)} films from {folder}"
    from train.synthetic import PLANTED_FINDINGS, render_sample

    rng = np.random.default_rng(0)
    images = [render_sample(rng, {k: float(rng.random() < 0.3) for k in PLANTED_FINDINGS}, 512)[0] for _ in range(n)]
    return torch.stack([preprocess(image, spec) for image in images]), f"{n} synthetic films"


@contextmanager
def precision(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    model, spec = load_checkpoint(args.model)
    model = model.float().eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x, described = films(args.images, args.n, spec)
    x = x.to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    trained = [spec.label_index(label) for label in spec.trained_labels]

    def run(dtype: torch.dtype | None, seed: int) -> tuple[np.ndarray, np.ndarray, list[list[object]], float]:
        with torch.inference_mode(), precision(device, dtype):
            deterministic = torch.cat([torch.sigmoid(model(b).float()) for b in x.split(args.batch)])
            generator = torch.Generator(device=device).manual_seed(seed)
            pred = mc_predict(model, x, args.samples, generator, return_samples=True)
            assert pred.samples is not None
            decisions = decide(pred.samples.float(), spec)
            batch = x[: args.batch]
            for _ in range(2):
                model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < 1.0 or calls < 3:
                model(batch)
                calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = calls * len(batch) / (time.perf_counter() - start)
        return deterministic.cpu().numpy(), pred.mean.float().cpu().numpy(), decisions, rate

    modes: list[tuple[str, torch.dtype | None, int]] = [("fp32", None, 0), ("fp32, other seed", None, 1)]
    modes += [("fp16 autocast", torch.float16, 0), ("bf16 autocast", torch.bfloat16, 0)]
    ref_det, ref_mc, ref_dec, _ = run(None, 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{spec.name} {spec.version} ({spec.arch}) on {name}, torch {torch.__version__}; {described}; T={args.samples}"
    )
    print(f"{'precision':<18}{'det max|dp|':>12}{'det mean':>10}{'MC max|dconf|':>15}{'MC mean':>9}"
          f"{'decisions changed':>19}{'images/s':>10}")  # fmt: skip
    for label, dtype, seed in modes:
        det, mc, dec, rate = run(dtype, seed)
        d_det = np.abs(det - ref_det)[:, trained]
        d_mc = np.abs(mc - ref_mc)[:, trained]
        changed = sum(dec[i][k] != ref_dec[i][k] for i in range(len(dec)) for k in trained)
        total = len(dec) * len(trained)
        print(
            f"{label:<18}{d_det.max():>12.4f}{d_det.mean():>10.4f}{d_mc.max():>15.4f}{d_mc.mean():>9.4f}"
            f"{f'{changed}/{total}':>19}{rate:>10.0f}"
        )


if __name__ == "__main__":
    main()
