"""ListImages and ListJobs: the index's images in id order and the jobs newest first, a
page at a time. Pages are keyed by id (page_token = the last id of the previous page), so
a listing neither repeats nor skips an item while others are added or deleted; the
page sizes and token rules are the contract's (delf_common.contract)."""
from __future__ import annotations

import grpc

from delf_common import contract
from delf_common.proto.delf.v1 import delf_pb2
from delf_gateway.backpressure import WorkerCalls
from delf_gateway.checks import RequestError, _checked, check_filter
from delf_gateway.ingest import job_proto


class ListCalls(WorkerCalls):
    """The listing RPCs of the gateway's servicer."""

    def ListImages(self, request, context):
        size = _checked(lambda n: contract.check_page_size(n, contract.IMAGES_PAGE_DEFAULT,
                                                           contract.IMAGES_PAGE_MAX, "images"), request.page_size)
        after = _checked(contract.check_image_page_token, request.page_token)
        options = {"after": after, "limit": size, "filter": check_filter(request.filter)}
        reply = self._call(contract.INDEX_LIST, options, context=context, what="indexer")
        return delf_pb2.ListImagesResponse(images=[image_info_proto(i) for i in reply["images"]],
                                           next_page_token=reply.get("next") or "")

    def ListJobs(self, request, context):
        size = _checked(lambda n: contract.check_page_size(n, contract.JOBS_PAGE_DEFAULT,
                                                           contract.JOBS_PAGE_MAX, "jobs"), request.page_size)
        after = _checked(contract.check_job_page_token, request.page_token)
        try:
            page, last = self.jobs.list_jobs(after, size)
        except LookupError:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"page_token {after!r} names no job (it may have expired): list again from "
                               f"the first page") from None
        return delf_pb2.ListJobsResponse(jobs=[job_proto(s) for s in page], next_page_token=last)


def image_info_proto(info: dict, thumbnail: bytes = b"") -> delf_pb2.ImageInfo:
    """An indexer's image info (``delf_indexer.rows.stored_info``) as the public ImageInfo."""
    return delf_pb2.ImageInfo(
        thumbnail=bytes(thumbnail),
        image_id=info["image_id"],
        metadata=info.get("metadata") or {},
        width=int(info.get("width", 0)),
        height=int(info.get("height", 0)),
        num_features=int(info.get("num_features", 0)),
        pca_id=info.get("pca_id", ""),
        sha256=info.get("sha256") or "",
        duplicate_of=info.get("duplicate_of") or [],
        skipped=bool(info.get("skipped")),
    )
