"""Search routes: by uploaded photo, by URL, by an indexed image's id."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, Field

from delf_common.fetch import FetchError, fetch_url
from delf_common.proto.delf.v1 import delf_pb2
from delf_web import convert, inputs
from delf_web.context import Ctx, context
from delf_web.errors import ApiError

router = APIRouter(prefix="/api/v1", tags=["search"])


class SearchOptions(BaseModel):
    top_k: int = Field(10, description="number of results, 1-100")
    box: list[float] | None = Field(None, description="[x0, y0, x1, y1]: only the query's features inside it")
    filter: dict[str, str] = Field(default_factory=dict, description="metadata pairs every result must have")
    correspondences: bool = Field(False, description="also each match's correspondences (query and "
                                                     "indexed points, RANSAC inlier or not)")


class SearchById(SearchOptions):
    image_id: str = Field(..., description="search with this indexed image")


class SearchByUrl(SearchOptions):
    url: str = Field(..., description="an http(s) URL of the query photo, fetched by this service "
                                      "under the ingest URL rules (DELF_URL_INGEST ...)")


def _request(top_k, box, filter, correspondences) -> delf_pb2.SearchRequest:
    request = delf_pb2.SearchRequest(top_k=inputs.top_k(top_k), filter=inputs.search_filter(filter),
                                     correspondences=bool(correspondences))
    region = inputs.box(box)
    if region is not None:
        request.box.CopyFrom(region)
    return request


def _search(ctx: Ctx, request: delf_pb2.SearchRequest) -> dict:
    return convert.search(ctx.call("Search", request))


@router.post("/search", summary="Search by an uploaded photo")
def search_upload(ctx: Annotated[Ctx, Depends(context)],
                  photo: Annotated[UploadFile, File(description="the query photo")],
                  top_k: Annotated[int, Form()] = 10,
                  box: Annotated[str, Form(description="x0,y0,x1,y1 in pixels of the photo")] = "",
                  filter: Annotated[list[str], Form(description="key=value, repeatable")] = [],  # noqa: B006 - FastAPI copies a default, never shares it
                  correspondences: Annotated[bool, Form()] = False) -> dict:
    """The indexed photos that show what the uploaded photo shows, best first."""
    request = _request(top_k, box, filter, correspondences)
    request.image = inputs.photo(photo.file.read(), ctx.settings.max_image_bytes)
    return _search(ctx, request)


@router.post("/search/by-id", summary="Search with an indexed image")
def search_by_id(body: SearchById, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    request = _request(body.top_k, body.box, body.filter, body.correspondences)
    request.image_id = inputs.image_id(body.image_id)
    return _search(ctx, request)


@router.post("/search/by-url", summary="Search by a photo's URL")
def search_by_url(body: SearchByUrl, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    request = _request(body.top_k, body.box, body.filter, body.correspondences)
    try:
        data = fetch_url(body.url, ctx.settings.fetch_policy)
    except FetchError as exc:
        raise ApiError(exc.code, exc.message) from None
    request.image = inputs.photo(data, ctx.settings.max_image_bytes)
    return _search(ctx, request)
