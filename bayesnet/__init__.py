"""bayesnet: the core library of the chest X-ray service.

A Bayesian EfficientNet (MC dropout with a frozen BatchNorm), Monte-Carlo prediction that runs the trunk
once, Grad-CAM, content-sniffing radiograph decoding and spec-driven preprocessing, the risk-controlled
referral rule's decisions, and safe checkpoints.
Pure library: no HTTP, no settings, no datasets. Importing it loads torch and timm, nothing more: no
model, no weights, no global state.
"""

from bayesnet.checkpoint import load_checkpoint, load_spec, save_checkpoint
from bayesnet.decision import Decision, decide
from bayesnet.errors import (
    BayesnetError,
    CheckpointError,
    CorruptImageError,
    DicomNoPixelDataError,
    EmptyImageError,
    ImageError,
    ImageGeometryError,
    ModelModeError,
    MultiFrameDicomError,
    NotAnImageError,
    NotRadiographError,
    PretrainedWeightsError,
    SpecError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from bayesnet.gradcam import gradcam
from bayesnet.imaging import (
    DecodedImage,
    ImageFacts,
    check_radiograph_geometry,
    decode_image,
    decode_memory_bytes,
    sniff_format,
)
from bayesnet.labels import CHEXPERT_LABELS
from bayesnet.mc import MCPrediction, input_seed, mc_predict
from bayesnet.model import BayesianEfficientNet, DropoutMasks, PerImageMasks, build_model
from bayesnet.ood import OODGate, load_ood_gate, save_ood_gate
from bayesnet.preprocess import preprocess
from bayesnet.pretrained import init_pretrained
from bayesnet.referral import Referral, referral_reasons, study_cleared
from bayesnet.runtime import model_thread, single_threaded_torch, tune_allocator
from bayesnet.spec import ModelSpec, OODSpec, ReferralSpec

__all__ = [
    "CHEXPERT_LABELS",
    "BayesianEfficientNet",
    "BayesnetError",
    "CheckpointError",
    "CorruptImageError",
    "Decision",
    "DecodedImage",
    "DicomNoPixelDataError",
    "DropoutMasks",
    "EmptyImageError",
    "ImageError",
    "ImageFacts",
    "ImageGeometryError",
    "MCPrediction",
    "ModelModeError",
    "ModelSpec",
    "MultiFrameDicomError",
    "NotAnImageError",
    "NotRadiographError",
    "OODGate",
    "OODSpec",
    "PerImageMasks",
    "PretrainedWeightsError",
    "Referral",
    "ReferralSpec",
    "SpecError",
    "TooManyPixelsError",
    "TruncatedImageError",
    "UnsupportedFormatError",
    "build_model",
    "check_radiograph_geometry",
    "decide",
    "decode_image",
    "decode_memory_bytes",
    "gradcam",
    "init_pretrained",
    "input_seed",
    "load_checkpoint",
    "load_ood_gate",
    "load_spec",
    "mc_predict",
    "model_thread",
    "preprocess",
    "referral_reasons",
    "save_checkpoint",
    "save_ood_gate",
    "single_threaded_torch",
    "sniff_format",
    "study_cleared",
    "tune_allocator",
]
