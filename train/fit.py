"""Training: ``python -m train fit`` (one process) or ``torchrun --nproc_per_node N -m train fit`` (DDP).

The loop reads top to bottom in :func:`fit`: data -> spec -> model (offline ImageNet init) -> AdamW with a
warmup + cosine schedule (a pure function of the step) -> per epoch: train with explicit autocast (and a
GradScaler for fp16), validate (per-label ROC-AUC on predictions gathered from every rank), log, keep the
best checkpoint by mean AUC over the annotated labels, save a resumable state, stop early. The run is
described by a :class:`train.config.FitConfig`, where its defaults live.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from bayesnet import BayesianEfficientNet, ModelSpec, build_model, init_pretrained, save_checkpoint
from bayesnet.labels import CHEXPERT_LABELS
from bayesnet.pretrained import LITE0_ARCH, LITE0_MEAN, LITE0_STD
from train.config import AmpMode, FitConfig

log = logging.getLogger("train.fit")

STATE_FILE = "training_state.pt"


@dataclass
class FitResult:
    best_auc: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


# --- pure pieces ------------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def masked_bce(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Mean BCE over the known targets only: NaN (unknown / U-Ignore / not annotated) adds nothing."""
    known = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets, nan=0.0), pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp_min(1)


def pos_weights(rates: np.ndarray, max_weight: float) -> Tensor:
    """``(1 - p) / p`` per label (class imbalance), 1 where unknown, clipped to ``[1, max_weight]``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(np.isfinite(rates) & (rates > 0), (1.0 - rates) / rates, 1.0)
    return torch.tensor(np.clip(weights, 1.0, max_weight), dtype=torch.float32)


def resolve_amp(mode: AmpMode, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: fp16 (+GradScaler) or bf16 on CUDA; bf16 on CPU only when asked (often slower)."""
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


# --- distributed --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def gather_rows(tensor: Tensor, ctx: Dist) -> Tensor:
    """Concatenate a (n_i, ...) tensor from every rank (sizes may differ) on every rank."""
    if not ctx.enabled:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes, strict=True)])


# --- the run ------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_spec(cfg: FitConfig, trained_labels: tuple[str, ...]) -> ModelSpec:
    lite = cfg.arch == LITE0_ARCH
    return ModelSpec(
        arch=cfg.arch,
        image_size=cfg.image_size,
        mean=(LITE0_MEAN,) if lite else ModelSpec().mean,
        std=(LITE0_STD,) if lite else ModelSpec().std,
        dropout=cfg.dropout,
        mc_dropout_blocks=cfg.mc_dropout_blocks,
        trained_labels=trained_labels,
        name=cfg.name,
        version=cfg.version,
        provenance=f"trained by python -m train fit on {cfg.train_csv.name} (init {cfg.init}, seed {cfg.seed})",
    )


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        yield


def predict_logits(
    model: nn.Module, loader: DataLoader[Any], device: torch.device, dtype: torch.dtype | None, ctx: Dist
) -> tuple[Tensor, Tensor]:
    """Deterministic logits and targets of a (possibly sharded) loader, gathered from every rank, on CPU.

    The loader must not shuffle: with a DistributedSampler its index order is this rank's share.
    """
    model.eval()
    logits, targets = [], []
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits.append(model(x).float())
            targets.append(y.to(device))
    sampler = loader.sampler
    indices = torch.tensor(list(iter(sampler)), dtype=torch.long, device=device)
    all_logits = gather_rows(torch.cat(logits), ctx).cpu()
    all_targets = gather_rows(torch.cat(targets), ctx).cpu()
    all_idx = gather_rows(indices, ctx).cpu()
    # DistributedSampler pads with repeats so every rank has the same count: keep each image once.
    order = np.unique(all_idx.numpy(), return_index=True)[1]
    return all_logits[order], all_targets[order]


def load_source(source: Path, policy: Any, *, max_samples: int | None = None, seed: int = 0) -> Any:
    """A CheXpert-layout CSV path, or ``hf://owner/name:split`` for a dataset on the Hugging Face Hub."""
    from train.data import load_chexpert, load_chexpert_hub

    text = str(source)
    if text.startswith("hf:/"):  # pathlib folds "hf://" to "hf:/"
        repo_id, _, split = text[len("hf:") :].lstrip("/").partition(":")
        return load_chexpert_hub(repo_id, split or "train", policy=policy, max_samples=max_samples, seed=seed)
    return load_chexpert(source, policy=policy, max_samples=max_samples, seed=seed)


def fit(cfg: FitConfig) -> FitResult:
    """Train per ``cfg``; writes ``out/best`` and ``out/last`` checkpoints, ``history.jsonl``, ``config.json``."""
    from train.chexpert_csv import parse_uncertain_policy
    from train.data import dataset_annotated_labels, patient_split, positive_rates
    from train.loader import make_loader, set_loader_epoch
    from train.metrics import per_label_auc, print_auc_table

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    ctx = init_distributed(device.type)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    seed_everything(cfg.seed)
    out = cfg.out
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json() + "\n")

    policy = parse_uncertain_policy(cfg.uncertain_policy)
    train_ds = load_source(cfg.train_csv, policy, max_samples=cfg.max_train_samples, seed=cfg.seed)
    if cfg.valid_csv is not None:
        valid_ds = load_source(cfg.valid_csv, policy)
    else:
        train_ds, valid_ds = patient_split(train_ds, cfg.valid_fraction, cfg.seed)
    trained = dataset_annotated_labels(train_ds)
    spec = make_spec(cfg, trained)
    label_mask = torch.tensor([label in trained for label in CHEXPERT_LABELS])

    model: BayesianEfficientNet = build_model(spec)
    init_pretrained(model, cfg.init)
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net: nn.Module = DistributedDataParallel(model) if ctx.enabled else model

    train_sampler = DistributedSampler(_IndexedView(train_ds), shuffle=True, seed=cfg.seed) if ctx.enabled else None
    valid_sampler = DistributedSampler(_IndexedView(valid_ds), shuffle=False) if ctx.enabled else None
    per_rank_batch = max(1, cfg.batch_size // ctx.world)
    train_loader = make_loader(
        train_ds,
        spec,
        train=True,
        batch_size=per_rank_batch,
        workers=cfg.workers,
        seed=cfg.seed,
        sampler=train_sampler,
    )
    valid_loader = make_loader(
        valid_ds,
        spec,
        train=False,
        batch_size=per_rank_batch,
        workers=cfg.workers,
        seed=cfg.seed,
        sampler=valid_sampler,
    )

    pos_weight = pos_weights(positive_rates(train_ds), cfg.max_pos_weight).to(device)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "name": "backbone"}, {"params": head, "name": "head"}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = max(1, len(train_loader))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    freeze_steps = cfg.freeze_epochs * steps_per_epoch

    def schedule(group: str) -> Any:
        def factor(step: int) -> float:
            if group == "backbone" and step < freeze_steps:
                return 0.0  # linear probe first: the head learns before the ImageNet features move
            return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=cfg.min_lr / cfg.lr)

        return factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule("backbone"), schedule("head")])
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

    start_epoch, best_auc, best_epoch, stale = 0, -math.inf, -1, 0
    history: list[dict[str, Any]] = []
    state_path = out / STATE_FILE
    if cfg.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_auc, best_epoch, stale = (
            int(state["epoch"]) + 1,
            float(state["best_auc"]),
            int(state["best_epoch"]),
            int(state["stale"]),
        )
        history = json.loads(state["history"])
        if ctx.main:
            log.info("resumed from %s at epoch %d", state_path, start_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed + epoch)
        set_loader_epoch(train_loader, epoch)
        net.train()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        batches = _progress(train_loader, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and ctx.main)
        for x, y in batches:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = net(x)
            loss = masked_bce(logits, y, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            batch_loss = loss.detach().item()
            seen += x.shape[0] * ctx.world
            loss_sum += batch_loss * x.shape[0]
            if hasattr(batches, "set_postfix"):
                rate = seen / max(1e-9, time.perf_counter() - started)
                batches.set_postfix(loss=f"{batch_loss:.4f}", img_s=f"{rate:.1f}")
        train_s = time.perf_counter() - started

        logits, targets = predict_logits(model, valid_loader, device, amp_dtype, ctx)
        probs = torch.sigmoid(logits).numpy()
        y_np = targets.numpy()
        y_np[:, ~label_mask.numpy()] = np.nan
        auc = per_label_auc(y_np, probs)
        mean_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen / ctx.world),
            "train_images_per_s": seen / max(1e-9, train_s),
            "lr": scheduler.get_last_lr()[-1],
            "valid_mean_auc": mean_auc,
            "valid_auc": {
                label: (None if math.isnan(a) else float(a)) for label, a in zip(CHEXPERT_LABELS, auc, strict=True)
            },
        }
        history.append(record)
        improved = mean_auc > best_auc
        if improved:
            best_auc, best_epoch, stale = mean_auc, epoch + 1, 0
        else:
            stale += 1
        if ctx.main:
            print(print_auc_table(list(CHEXPERT_LABELS), auc), flush=True)
            print(
                f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, valid mean AUC {mean_auc:.4f}"
                f"{' (best)' if improved else ''}, {record['train_images_per_s']:.1f} img/s",
                flush=True,
            )
            with (out / "history.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            _tensorboard(out, record)
            meta = {"epoch": epoch + 1, "valid_mean_auc": mean_auc, "config": json.loads(cfg.to_json())}
            if improved:
                save_checkpoint(model, spec, out / "best", metadata=meta)
            save_checkpoint(model, spec, out / "last", metadata=meta)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "best_auc": best_auc,
                    "best_epoch": best_epoch,
                    "stale": stale,
                    "history": json.dumps(history),
                },
                state_path,
            )
        if ctx.enabled:
            dist.barrier()
        if stale >= cfg.patience:
            if ctx.main:
                print(f"early stop: no improvement for {cfg.patience} epochs", flush=True)
            break
    if ctx.enabled:
        dist.destroy_process_group()
    return FitResult(best_auc, best_epoch, len(history), history)


class _IndexedView(torch.utils.data.Dataset[int]):
    """A length-only view so DistributedSampler can shard a datasets.Dataset by index."""

    def __init__(self, ds: Any) -> None:
        self.n = len(ds)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _progress(loader: DataLoader[Any], desc: str, enabled: bool) -> Any:
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _tensorboard(out: Path, record: dict[str, Any]) -> None:
    """Also log to TensorBoard when it is installed (optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    with SummaryWriter(str(out / "tensorboard")) as writer:
        step = int(record["epoch"])
        writer.add_scalar("train/loss", record["train_loss"], step)
        writer.add_scalar("valid/mean_auc", record["valid_mean_auc"], step)
        for label, value in record["valid_auc"].items():
            if value is not None:
                writer.add_scalar(f"valid_auc/{label}", value, step)
