"""Domain exceptions of the core library.

Every error a caller can act on has its own class, so the service maps classes (not message text) to
HTTP statuses in one place, and training scripts can tell a bad file from a bad checkpoint.
"""

from __future__ import annotations


class BayesnetError(Exception):
    """Base class of every error raised on purpose by :mod:`bayesnet`."""


# --- images ---------------------------------------------------------------------------------------


class ImageError(BayesnetError, ValueError):
    """An upload could not be turned into a radiograph. The message says what to do about it."""


class EmptyImageError(ImageError):
    """Zero bytes were received."""


class NotAnImageError(ImageError):
    """The bytes are not a PNG, JPEG or DICOM file (sniffed from content, never from a file name)."""


class UnsupportedFormatError(ImageError):
    """A recognised image format or variant that this service does not read (GIF, TIFF, 12-bit JPEG...)."""


class CorruptImageError(ImageError):
    """The file claims a supported format but its content is damaged or inconsistent."""


class TruncatedImageError(CorruptImageError):
    """The file ends before its pixel data does (an interrupted upload or copy)."""


class TooManyPixelsError(ImageError):
    """The declared image size is above the configured pixel limit (decompression-bomb guard)."""


class DicomNoPixelDataError(ImageError):
    """A DICOM object without an image in it (a report, a presentation state, a header only)."""


class MultiFrameDicomError(ImageError):
    """A DICOM with several frames (cine, tomosynthesis, volume); one radiograph is expected."""


class NotRadiographError(ImageError):
    """A DICOM whose modality is not projection radiography (CT, MR, ultrasound...)."""


class ImageGeometryError(ImageError):
    """An image too small or too elongated to be a radiograph (a 1 x 1 pixel, a 20000 x 1 strip)."""


# --- checkpoints and specs ------------------------------------------------------------------------


class SpecError(BayesnetError, ValueError):
    """A model spec is invalid or inconsistent."""


class CheckpointError(BayesnetError):
    """A checkpoint directory is missing, damaged, or does not match its spec."""


class PretrainedWeightsError(BayesnetError):
    """Offline initial weights are missing, fail their checksum, or do not fit the architecture."""


class ModelModeError(BayesnetError, RuntimeError):
    """An inference function was called on a model in training mode (BatchNorm would update)."""
