"""POST /v1/preview: the decoded radiograph as a PNG a browser can show (DICOM included)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import Response

from service.api.routes.deps import (
    ERRORS,
    RAW_UPLOAD_OPENAPI,
    Pipeline,
    Protected,
    read_image,
)

router = APIRouter()


@router.post(
    "/v1/preview",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "8-bit grayscale PNG"}, **ERRORS},  # type: ignore[dict-item]
    dependencies=Protected,
    summary="The decoded radiograph as a PNG a browser can show (DICOM included)",
    tags=["predict"],
    openapi_extra=RAW_UPLOAD_OPENAPI,
)
async def preview(
    request: Request,
    pipeline: Pipeline,
    file: Annotated[
        UploadFile | None, File(description="PNG, JPEG or DICOM radiograph; or send the image as the raw body")
    ] = None,
) -> Response:
    data = await read_image(request, file)
    return Response(await pipeline.preview(data), media_type="image/png", headers={"Cache-Control": "no-store"})
