"""Run a checkpoint over a CheXpert-layout CSV: the targets, one deterministic pass and T MC samples per film.

What ``python -m train evaluate`` and ``python -m train calibrate`` both start from. The trunk runs once per
batch; the deterministic pass and the stochastic samples share it, as in the service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bayesnet import BayesianEfficientNet, ModelSpec
from bayesnet.checkpoint import read_checkpoint_document
from bayesnet.mc import input_seed, mc_logits
from bayesnet.model import PerImageMasks

__all__ = ["Predictions", "collect", "collect_checkpoint", "policy_of", "sigmoid", "weights_sha256_of"]


@dataclass(frozen=True)
class Predictions:
    """Everything evaluation needs, for N images and the K labels of the spec."""

    y: np.ndarray  # (N, K) 0/1, NaN = unknown or a label the model was not trained on
    det_logits: np.ndarray  # (N, K) deterministic pass
    mc_logits: np.ndarray  # (T, N, K) stochastic passes (uncalibrated)
    seconds_per_image: float


def weights_sha256_of(checkpoint: Path) -> str:
    """The sha256 of a checkpoint's weights file, as its ``model.json`` records it (the service's MC seed salt)."""
    return str(read_checkpoint_document(checkpoint)["weights_sha256"])


def policy_of(checkpoint: Path) -> str:
    document = read_checkpoint_document(checkpoint)
    config = (document.get("metadata") or {}).get("config") or {}
    return str(config.get("uncertain_policy", "chexpert"))


def collect(
    model: BayesianEfficientNet,
    spec: ModelSpec,
    csv: Path,
    *,
    policy: str,
    mc_samples: int,
    batch_size: int = 16,
    workers: int = 0,
    seed: int = 0,
    device: torch.device | None = None,
    weights_sha256: str | None = None,
) -> Predictions:
    """Run the model over a CSV: deterministic logits and T stochastic logits per image (trunk once).

    ``weights_sha256`` (a saved checkpoint's, :func:`weights_sha256_of`): each film's dropout masks come from its own
    seed, :func:`bayesnet.input_seed` of its model input and that digest, exactly as the service and the archive
    scorer draw them, so a film gets the numbers here that it gets over HTTP. None (a model not saved yet): one
    stream from ``seed`` for the whole run.
    """
    from train.chexpert_csv import parse_uncertain_policy
    from train.data import load_chexpert
    from train.loader import make_loader

    device = device or next(model.parameters()).device
    ds = load_chexpert(csv, policy=parse_uncertain_policy(policy))
    loader = make_loader(ds, spec, train=False, batch_size=batch_size, workers=workers, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    ys, dets, mcs = [], [], []
    started = time.perf_counter()
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device)
            trunk = model.forward_trunk(x)
            dets.append(model.forward_stochastic(trunk).float().cpu())  # eval mode, no masks: deterministic
            if weights_sha256 is None:
                mcs.append(mc_logits(model, trunk, mc_samples, generator=generator).cpu())
            else:
                seeds = [input_seed(image, weights_sha256) for image in x]
                mcs.append(mc_logits(model, trunk, mc_samples, masks=PerImageMasks(seeds, mc_samples)).cpu())
            ys.append(y)
    elapsed = time.perf_counter() - started
    y_all = torch.cat(ys).numpy().astype(np.float64)
    untrained = [i for i, label in enumerate(spec.labels) if label not in spec.trained_labels]
    y_all[:, untrained] = np.nan
    return Predictions(
        y=y_all,
        det_logits=torch.cat(dets).numpy().astype(np.float64),
        mc_logits=torch.cat(mcs, dim=1).numpy().astype(np.float64),
        seconds_per_image=elapsed / max(1, len(y_all)),
    )


def collect_checkpoint(
    model: BayesianEfficientNet, spec: ModelSpec, checkpoint: Path, csv: Path, *, mc_samples: int, seed: int = 0
) -> Predictions:
    """:func:`collect` for a saved checkpoint: its uncertain-label policy, and each film's masks drawn from the seed
    the service would give it (the checkpoint's weights digest)."""
    return collect(
        model,
        spec,
        csv,
        policy=policy_of(checkpoint),
        mc_samples=mc_samples,
        seed=seed,
        weights_sha256=weights_sha256_of(checkpoint),
    )


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))
