"""The collection: add, replace, get, delete, list images; thumbnails; stats; health."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from delf_common.proto.delf.v1 import delf_pb2
from delf_web import convert, inputs
from delf_web.context import Ctx, context
from delf_web.errors import ApiError

router = APIRouter(prefix="/api/v1", tags=["images"])
MAX_PAGE = 1000
Photo = Annotated[UploadFile, File(description="a JPEG, PNG, WebP, BMP or TIFF photo")]
Metadata = Annotated[str, Form(description='a JSON object of strings, e.g. {"place": "Bern"}')]


def _add(ctx: Ctx, image_id: str, photo: UploadFile, metadata: str) -> dict:
    request = delf_pb2.AddImageRequest(image_id=inputs.image_id(image_id), metadata=inputs.metadata(metadata))
    request.image = inputs.photo(photo.file.read(), ctx.settings.max_image_bytes)
    return convert.image(ctx.call("AddImage", request))


@router.get("/images", summary="List the indexed images, ordered by id, a page at a time")
def list_images(ctx: Annotated[Ctx, Depends(context)],
                page_size: Annotated[int | None, Query(description=f"1-{MAX_PAGE}; default 100")] = None,
                page_token: Annotated[str, Query(description="the previous page's next_page_token")] = "",
                filter: Annotated[list[str], Query(description="key=value, repeatable")] = []) -> dict:  # noqa: B006 - FastAPI copies a default, never shares it
    request = delf_pb2.ListImagesRequest(page_size=inputs.page_size(page_size, MAX_PAGE), page_token=page_token,
                                         filter=inputs.search_filter(filter))
    reply = ctx.call("ListImages", request)
    return {"images": [convert.image(i) for i in reply.images], "next_page_token": reply.next_page_token}


@router.post("/images", summary="Add (or replace) an image")
def add_image(ctx: Annotated[Ctx, Depends(context)], image_id: Annotated[str, Form()], photo: Photo,
              metadata: Metadata = "") -> dict:
    return _add(ctx, image_id, photo, metadata)


@router.put("/images/{image_id:path}", summary="Add or replace the image with this id")
def put_image(image_id: str, ctx: Annotated[Ctx, Depends(context)], photo: Photo, metadata: Metadata = "") -> dict:
    return _add(ctx, image_id, photo, metadata)


@router.get("/images/{image_id:path}", summary="What the index holds for an image")
def get_image(image_id: str, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    request = delf_pb2.GetImageRequest(image_id=inputs.image_id(image_id))
    return convert.image(ctx.call("GetImage", request))


@router.delete("/images/{image_id:path}", summary="Delete an image and its descriptors")
def delete_image(image_id: str, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    reply = ctx.call("DeleteImage", delf_pb2.DeleteImageRequest(image_id=inputs.image_id(image_id)))
    return {"image_id": reply.image_id, "descriptors_removed": reply.descriptors_removed}


@router.get("/thumbnails/{image_id:path}", summary="The stored thumbnail (JPEG) of an image",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def thumbnail(image_id: str, ctx: Annotated[Ctx, Depends(context)]) -> Response:
    info = ctx.call("GetImage", delf_pb2.GetImageRequest(image_id=inputs.image_id(image_id), thumbnail=True))
    if not info.thumbnail:
        raise ApiError("NOT_FOUND", f"image {image_id!r} has no stored thumbnail")
    return Response(info.thumbnail, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})


@router.get("/stats", summary="Images, descriptors, queue depths, model", tags=["system"])
def stats(ctx: Annotated[Ctx, Depends(context)]) -> dict:
    return convert.stats(ctx.call("GetStats", delf_pb2.GetStatsRequest()))


@router.get("/health", summary="Whether this service and the gateway serve (no token needed)", tags=["system"])
def health(request: Request) -> JSONResponse:
    serving, status = request.app.state.gateway.serving()
    body = {"web": "SERVING", "gateway": status}
    return JSONResponse(body, status_code=200 if serving else 503)
