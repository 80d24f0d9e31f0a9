"""The service's own errors: each class carries the status, title and advice a caller can act on.

They are raised by the runtime, the audit trail and the DICOM services alike; nothing here knows HTTP.
``service.problems.problem_for`` classifies every exception (these, ``bayesnet.ImageError`` subclasses,
batcher errors) into a status and a title; ``service.api.problems`` renders that as problem details.
"""

from __future__ import annotations

from bayesnet import ImageFacts
from service.schemas import OODResult

__all__ = [
    "AdminOnlyError",
    "AuditUnavailableError",
    "BadRequestError",
    "BadRequestParameterError",
    "InferenceFailedError",
    "InferenceTimeoutError",
    "MissingFileError",
    "NotAcceptableError",
    "NotFoundError",
    "NotReadyError",
    "OutOfDistributionError",
    "ServiceError",
    "UnauthorizedError",
    "UnsupportedUploadError",
    "UploadTooLargeError",
]


class ServiceError(Exception):
    """An error with an HTTP meaning raised by the service layer."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequestError(ServiceError):
    status = 400
    title = "Bad request"


class NotReadyError(ServiceError):
    status = 503
    title = "Service not ready"


class UploadTooLargeError(ServiceError):
    status = 413
    title = "Upload too large"


class MissingFileError(ServiceError):
    """A form without the field ``file``, or an empty raw body: nothing to score."""

    status = 422
    title = "Invalid request"


class UnsupportedUploadError(ServiceError):
    """A request body that is neither a multipart form nor an image Content-Type."""

    status = 415
    title = "Unsupported media type"


class BadRequestParameterError(ServiceError):
    status = 422
    title = "Invalid request parameter"


class InferenceFailedError(ServiceError):
    status = 500
    title = "Inference failed"


class InferenceTimeoutError(ServiceError):
    status = 504
    title = "Inference timed out"


class UnauthorizedError(ServiceError):
    status = 401
    title = "Missing or invalid API key"


class OutOfDistributionError(ServiceError):
    """The out-of-distribution gate flagged the image and the service runs with ``ood_action=reject``."""

    status = 422
    title = "This does not look like a frontal chest radiograph"

    def __init__(
        self,
        detail: str,
        *,
        ood: OODResult | None = None,
        image: ImageFacts | None = None,
        mc_samples: int | None = None,
    ) -> None:
        super().__init__(detail)
        # What the audit trail records about the refused image (service.audit): never returned to the client.
        self.ood, self.image, self.mc_samples = ood, image, mc_samples


class AuditUnavailableError(ServiceError):
    """The audit record of this request could not be made durable (``CXR_AUDIT_POLICY``, docs/audit.md)."""

    status = 503
    title = "Audit trail unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class NotFoundError(ServiceError):
    status = 404
    title = "Not found"


class AdminOnlyError(ServiceError):
    """A prediction key offered where an admin key is required (the audit read API)."""

    status = 403
    title = "Admin key required"


class OutcomeKeyRequiredError(ServiceError):
    """A prediction or admin key offered where an outcome key is required (``POST /v1/outcomes``)."""

    status = 403
    title = "Outcome key required"


class NoGuaranteeError(ServiceError):
    """The guarantee's operation asked of a model without a referral rule (``/v1/guarantee``)."""

    status = 409
    title = "No guarantee to operate"


class NotAcceptableError(ServiceError):
    """The Accept header rules out every representation the endpoint offers (JSON and FHIR R4 JSON)."""

    status = 406
    title = "Not acceptable"
