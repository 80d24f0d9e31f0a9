"""Checkpoints: a directory with ``model.safetensors`` (weights) and ``model.json`` (spec + weights sha256).

Loading never unpickles (safetensors holds raw tensors only), verifies the weights' sha256 before
reading them, is strict about keys and shapes, and reports which file is wrong and how.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bayesnet.errors import CheckpointError, SpecError
from bayesnet.model import BayesianEfficientNet, build_model
from bayesnet.spec import ModelSpec

CHECKPOINT_FORMAT: Final = "bayesnet-checkpoint/1"
WEIGHTS_FILE: Final = "model.safetensors"
SPEC_FILE: Final = "model.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    model: BayesianEfficientNet,
    spec: ModelSpec | None,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json``; returns the directory.

    ``spec`` defaults to ``model.spec`` and must describe the same architecture and labels.
    ``dtype`` (e.g. ``torch.float16``) stores floating tensors at lower precision to ship a small file;
    loading casts them back to the model's dtype. ``metadata`` is extra JSON kept in ``model.json``.
    """
    spec = spec if spec is not None else model.spec
    if (spec.arch, spec.labels, spec.in_chans, spec.mc_dropout_blocks) != (
        model.spec.arch,
        model.spec.labels,
        model.spec.in_chans,
        model.spec.mc_dropout_blocks,
    ):
        raise CheckpointError(
            "the spec to save does not describe this model (arch, labels, channels or MC layout differ)"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    weights = out / WEIGHTS_FILE
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    # safetensors creates the file owner-only (0600); a service running as another user must read it.
    tmp.chmod(0o644)
    tmp.replace(weights)
    document = {
        "format": CHECKPOINT_FORMAT,
        "weights": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "spec": spec.to_dict(),
        "metadata": metadata or {},
    }
    (out / SPEC_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return out


def replace_spec(path: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Rewrite only the spec of a checkpoint (e.g. after calibration); the weights file is not touched.

    The new spec must describe the same architecture, labels, channels and MC layout as the old one. The
    file is replaced atomically, so a reader sees the old spec or the new one, never half of either.
    """
    root = Path(path)
    document = read_checkpoint_document(root)
    old = load_spec(root)
    if (spec.arch, spec.labels, spec.in_chans, spec.mc_dropout_blocks) != (
        old.arch,
        old.labels,
        old.in_chans,
        old.mc_dropout_blocks,
    ):
        raise CheckpointError(f"{root / SPEC_FILE}: the new spec does not describe these weights")
    document["spec"] = spec.to_dict()
    tmp = root / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(root / SPEC_FILE)


def read_checkpoint_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``model.json`` of a checkpoint directory, with its format checked."""
    spec_path = Path(path) / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{spec_path}: missing; a checkpoint is a directory with {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{spec_path}: not readable JSON ({err})") from err
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(f"{spec_path}: format {found!r} is not {CHECKPOINT_FORMAT!r}")
    return document


def load_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Only the spec of a checkpoint (cheap: no weights read)."""
    document = read_checkpoint_document(path)
    try:
        return ModelSpec.from_dict(document["spec"])
    except (KeyError, TypeError, SpecError) as err:
        raise CheckpointError(f"{Path(path) / SPEC_FILE}: invalid spec ({err})") from err


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[BayesianEfficientNet, ModelSpec]:
    """Rebuild the model from a checkpoint directory: ``(model in eval mode on device, spec)``.

    Raises :class:`CheckpointError` naming the file and the problem: missing files, bad JSON, a
    sha256 mismatch (``verify``), missing/unexpected keys or shapes that do not fit the spec.
    """
    root = Path(path)
    document = read_checkpoint_document(root)
    spec = load_spec(root)
    name = str(document.get("weights", WEIGHTS_FILE))
    if Path(name).name != name or name in ("", ".", ".."):
        # A checkpoint is one self-contained directory: never follow a spec file to weights elsewhere.
        raise CheckpointError(f"{root / SPEC_FILE}: 'weights' must be a file name inside the checkpoint, got {name!r}")
    weights = root / name
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    if verify:
        expected = document.get("weights_sha256")
        actual = sha256_file(weights)
        if expected != actual:
            raise CheckpointError(
                f"{weights}: sha256 {actual} does not match {expected} recorded in {SPEC_FILE} "
                "(file damaged or replaced)"
            )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
    model = build_model(spec)
    reference = model.state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: keys do not match the spec's architecture {spec.arch!r} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for key, ref in reference.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {tuple(state[key].shape)} but the spec "
                f"({spec.arch}, {spec.num_classes} labels, {spec.in_chans} channel(s)) needs {tuple(ref.shape)}"
            )
        if ref.is_floating_point():
            state[key] = state[key].to(ref.dtype)
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    return model, spec
