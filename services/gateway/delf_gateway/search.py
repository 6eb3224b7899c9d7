"""Search orchestration: one Search call through the workers.

The query's features come from the extractor (photo bytes) or the indexer (an indexed
image_id), optionally cut to a box; the indexer votes for a shortlist of candidates;
the verifiers check them geometrically in parallel chunks; the ranked matches become
the SearchResponse.
"""
from __future__ import annotations

import time

import grpc
import numpy as np

from delf_common import contract
from delf_common.features import DelfFeatures
from delf_common.messages import SearchCandidate, VerifiedMatch, VerifyQuery
from delf_common.proto.delf.v1 import delf_pb2
from delf_common.ranking import match_score, rank_matches
from delf_gateway.backpressure import WorkerCalls
from delf_gateway.checks import RequestError, check_box, check_filter, check_image_id, check_photo

DEFAULT_TOP_K = 10
MAX_TOP_K = 100
VERIFY_CHUNK = 10  # candidates per verify task; chunks run in parallel on the verifier workers


class SearchCalls(WorkerCalls):
    """The Search RPC of the gateway's servicer."""

    def Search(self, request, context):
        with self._search_slot():
            return self._search(request, context)

    def _search(self, request, context):
        started = time.monotonic()
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k > MAX_TOP_K:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k is {top_k}; the limit is {MAX_TOP_K}")
        filter = check_filter(request.filter)
        features, (width, height), exclude = self._query_features(request, context)

        box = None
        if request.HasField("box"):
            box = check_box(request.box, width, height)
            features = features.inside(box)

        response = delf_pb2.SearchResponse(query_features=len(features),
                                           verified_score=self.settings.verified_score)
        if len(features) == 0:
            response.elapsed_s = time.monotonic() - started
            return response

        shortlist = max(self.settings.shortlist, top_k)
        options = {"shortlist": shortlist, "exclude": exclude}
        if filter:
            options["filter"] = filter
        reply = self._call(contract.INDEX_SEARCH, features.to_wire(), options, context=context, what="indexer")
        candidates = reply["candidates"]  # passed on to the verifiers as received
        by_id = {c.image_id: c for c in map(SearchCandidate.from_wire, candidates)}
        matches = self._verify(features, (width, height), box, candidates, context, request.correspondences)
        for m in map(VerifiedMatch.from_wire, rank_matches(matches)[:top_k]):
            cand = by_id.get(m.image_id)
            match = match_proto(m, cand.metadata if cand else {})
            if request.correspondences and cand is not None:
                add_correspondences(match, features.locations[cand.query_idx], cand.db_xy, m.inlier_idx)
            response.matches.append(match)
        response.elapsed_s = time.monotonic() - started
        return response

    def _query_features(self, request, context) -> tuple[DelfFeatures, tuple[int, int], list[str]]:
        """The query's features, its image size and the ids to leave out of the answer
        (an indexed query image does not find itself)."""
        which = request.WhichOneof("query")
        exclude: list[str] = []
        if which == "image":
            width, height = check_photo(request.image, self.settings.image_limits)
            self._admit("extract", "index", "verify")
            reply = self._call(contract.EXTRACT, request.image, {}, context=context, what="extractor")
            features = DelfFeatures.from_wire(reply["features"])
        elif which == "image_id":
            image_id = check_image_id(request.image_id)
            self._admit("index", "verify")
            reply = self._call(contract.INDEX_FEATURES, image_id, context=context, what="indexer")
            features = DelfFeatures.from_wire(reply["features"])
            width, height = features.image_size
            exclude.append(image_id)
        else:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "give the query as image bytes or an image_id")
        return features, (width, height), exclude

    def _verify(self, features: DelfFeatures, size, box, candidates: list[dict], context,
                inliers: bool = False) -> list[dict]:
        """The verified matches (wire) of the candidates (wire), verified in parallel chunks;
        ``inliers``: each also says which of its correspondences are inliers."""
        if not candidates:
            return []
        query = VerifyQuery(features.locations, size, scales=features.scales, box=box).to_wire()
        options = {
            "verified_score": self.settings.verified_score,
            "ransac_px": self.settings.ransac_px,
        }
        if inliers:
            options["inlier_idx"] = True
        pending = [
            self._send(contract.VERIFY, query, candidates[i:i + VERIFY_CHUNK], options, context=context)
            for i in range(0, len(candidates), VERIFY_CHUNK)
        ]
        matches: list[dict] = []
        for result in pending:
            matches.extend(self._wait(result, context, "verifier")["matches"])
        return matches


def match_proto(m: VerifiedMatch, metadata: dict) -> delf_pb2.Match:
    """The match as the API answers it; its score is the shared ranking score
    (``delf_common.ranking.match_score``), the same scale for every result."""
    score = match_score(m.votes, m.inliers)
    match = delf_pb2.Match(
        image_id=m.image_id,
        metadata=metadata,
        inliers=m.inliers,
        score=score,
        verified=m.verified,
        votes=m.votes,
        transform=m.transform,
    )
    for x, y in m.corners:
        match.corners.append(delf_pb2.Point(x=float(x), y=float(y)))
    return match


def add_correspondences(match: delf_pb2.Match, query_xy, db_xy, inlier_idx) -> None:
    """The match's correspondences (query point, indexed point, inlier or not); no inlier
    when the verifier did not say (``inlier_idx`` None: an older verifier)."""
    inlier = np.zeros(len(db_xy), bool)
    if inlier_idx is not None:
        inlier[inlier_idx[(inlier_idx >= 0) & (inlier_idx < len(inlier))]] = True
    pairs = zip(np.asarray(query_xy).tolist(), np.asarray(db_xy).tolist(), inlier.tolist())
    for (qx, qy), (dx, dy), flag in pairs:
        match.correspondences.add(query=delf_pb2.Point(x=qx, y=qy), indexed=delf_pb2.Point(x=dx, y=dy),
                                  inlier=flag)
