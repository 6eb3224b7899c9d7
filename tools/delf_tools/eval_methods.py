"""The three methods `delf eval` compares: the running system through its gateway
(`run_delf`), global GeM vectors in Milvus Lite (`run_global_gem`) and RootSIFT with the
system's voting and RANSAC (`run_sift`). Each returns a `MethodRun`."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Callable

import numpy as np

from delf_common import config
from delf_tools.eval_local import ExactVoter, LocalFeatures, rerank, rootsift
from delf_tools.eval_set import TOP_K, EvalError, MethodRun, Photo, load_rgb

GEM_P = 3.0
GEM_SCALES = (0.7071, 1.0, 1.4142)


# --------------------------------------------------------------------------- delf (the system)


def connect(gateway: str | None, token: str | None = None, tls_ca: str | None = None,
            timeout: float | None = None):
    """A DelfClient to a reachable gateway, or EvalError saying how to start one."""
    import grpc

    from delf_common.client import DelfClient

    client = DelfClient(gateway, timeout=timeout or 600.0, token=token, tls_ca=tls_ca)
    try:
        client.wait_ready(timeout=10)
    except grpc.FutureTimeoutError:
        client.close()
        raise EvalError(
            f"cannot reach the gateway at {client.target}: start the system first (`make up`, or "
            f"`delf up --data-dir /tmp/evaldata` for a fresh index) and pass its address with "
            f"--gateway or DELF_GATEWAY (a TLS gateway also needs --tls-ca / DELF_TLS_CA)") from None
    return client


def run_delf(photos: list[Photo], queries: dict[str, set[str]], client, top_k: int = TOP_K,
             log: Callable[[str], None] = print) -> MethodRun:
    """Ingest every photo as one job through the gateway, then search by indexed id."""
    import grpc

    from delf_common.proto.delf.v1 import delf_pb2

    def items():
        for p in photos:
            yield delf_pb2.IngestItem(image_id=p.image_id, metadata={"path": p.rel, "group": p.group},
                                      image=p.path.read_bytes())

    t = time.monotonic()
    job = client.start_ingest_job(items())
    log(f"delf: ingest job {job.job_id} ({len(photos)} photos) into the running index ...")
    job = client.wait_job(job.job_id)
    ingest_s = time.monotonic() - t
    for err in job.errors:
        log(f"delf: not indexed {err.image_id}: {err.reason}")
    rankings, latencies = {}, []
    for n, q in enumerate(queries, 1):
        t = time.monotonic()
        try:
            response = client.search(image_id=q, top_k=top_k)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log(f"delf: query {q} is not in the index ({exc.details()}); counted as a miss")
            rankings[q] = []
            continue
        latencies.append(time.monotonic() - t)
        rankings[q] = [m.image_id for m in response.matches]
        if n % 20 == 0:
            log(f"delf: {n}/{len(queries)} queries")
    return MethodRun(rankings, latencies, ingest_s, job.done)


# --------------------------------------------------------------------------- global GeM baseline


class GemExtractor:
    """GeM-pooled (p=3), L2-normalised 1280-d vectors of EfficientNet-Lite0's head output,
    averaged over scales. Reuses the extractor's network and preprocessing (`models.DelfNet`)."""

    def __init__(self, scales=GEM_SCALES, p: float = GEM_P, device: str | None = "cpu",
                 pretrained: bool = True):
        import torch
        from torch import nn

        from delf_extractor import models

        class HeadOutput(nn.Module):  # the full network's last feature map, before pooling / fc
            def __init__(self, net: models.EfficientNetLite):
                super().__init__()
                self.net = net

            def forward(self, x):
                x = self.net.features(x)
                return torch.nn.functional.relu6(self.net._bn1(self.net._conv_head(x)))

        base = models.get_config("effnet-lite0")
        self.cfg = dataclasses.replace(base, name="effnet-lite0-gem", layer="head", channels=1280,
                                       scales=tuple(scales))
        self.device = models.resolve_device(device)
        backbone = HeadOutput(models.load_lite(0, None, pretrained=pretrained))
        self.net = models.DelfNet(self.cfg, backbone, None).eval().to(self.device)
        self.p = p

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w = rgb.shape[:2]
        x = torch.from_numpy(np.array(rgb, np.uint8)).to(self.device).permute(2, 0, 1)[None].float()
        acc = torch.zeros(self.cfg.channels, device=self.device)
        with torch.inference_mode():
            for s in self.cfg.scales:
                size = (max(32, round(h * s)), max(32, round(w * s)))
                level = x if size == (h, w) else F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)
                feats, _ = self.net(level)
                g = feats.float().clamp(min=1e-6).pow(self.p).mean((2, 3)).pow(1.0 / self.p)[0]
                acc += F.normalize(g, dim=0)
            return F.normalize(acc, dim=0).cpu().numpy().astype(np.float32)


def run_global_gem(photos: list[Photo], queries: dict[str, set[str]], top_k: int = TOP_K,
                   log: Callable[[str], None] = print, extractor: GemExtractor | None = None) -> MethodRun:
    """Global GeM vectors in a temporary Milvus Lite collection (FLAT, inner product)."""
    from pymilvus import DataType, MilvusClient

    from delf_indexer.checks import quote

    t = time.monotonic()
    gem = extractor or GemExtractor()
    vectors: dict[str, np.ndarray] = {}
    for n, p in enumerate(photos, 1):
        try:
            vectors[p.image_id] = gem(load_rgb(p.path))
        except Exception as exc:  # noqa: BLE001 - a photo the system would refuse too
            log(f"global-gem: skipped {p.rel}: {exc}")
        if n % 20 == 0:
            log(f"global-gem: {n}/{len(photos)} photos")
    with tempfile.TemporaryDirectory(prefix="delf-eval-") as tmp:
        uri = os.path.join(tmp, "gem.db")
        client = MilvusClient(uri=uri)
        try:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("image_id", DataType.VARCHAR, max_length=512, is_primary=True)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=gem.cfg.channels)
            index = client.prepare_index_params()
            index.add_index("vec", index_type="FLAT", metric_type="IP")
            client.create_collection("gem", schema=schema, index_params=index, consistency_level="Strong")
            rows = [{"image_id": i, "vec": v} for i, v in vectors.items()]
            for s in range(0, len(rows), 500):
                client.insert("gem", rows[s:s + 500])
            client.flush("gem")
            client.load_collection("gem")
            ingest_s = time.monotonic() - t
            rankings, latencies = {}, []
            for q in queries:
                if q not in vectors:
                    rankings[q] = []
                    continue
                t = time.monotonic()
                hits = client.search("gem", data=[vectors[q]], limit=top_k, filter=f"image_id != {quote(q)}",
                                     anns_field="vec", output_fields=["image_id"],
                                     search_params={"metric_type": "IP"})[0]
                latencies.append(time.monotonic() - t)
                rankings[q] = [h["entity"]["image_id"] for h in hits]
        finally:
            client.close()
            try:
                from delf_indexer.backends.lite_fast import release_server

                release_server(uri)
            except Exception:  # noqa: BLE001 - best effort: the temporary file goes anyway
                pass
    return MethodRun(rankings, latencies, ingest_s, len(vectors))


def run_sift(photos: list[Photo], queries: dict[str, set[str]], top_k: int = TOP_K,
             log: Callable[[str], None] = print) -> MethodRun:
    t = time.monotonic()
    feats: dict[str, LocalFeatures] = {}
    for n, p in enumerate(photos, 1):
        try:
            feats[p.image_id] = rootsift(load_rgb(p.path))
        except Exception as exc:  # noqa: BLE001 - a photo the system would refuse too
            log(f"sift: skipped {p.rel}: {exc}")
        if n % 20 == 0:
            log(f"sift: {n}/{len(photos)} photos")
    voter = ExactVoter(feats)
    ingest_s = time.monotonic() - t
    # As the gateway: the shortlist covers top_k; verified as the verifier decides.
    shortlist = max(config.get("DELF_SHORTLIST"), top_k)
    neighbours, ratio = config.get("DELF_NEIGHBOURS"), config.get("DELF_RATIO")
    ransac_px, verified_score = config.get("DELF_RANSAC_PX"), config.get("DELF_VERIFIED_SCORE")
    rankings, latencies = {}, []
    for n, q in enumerate(queries, 1):
        if q not in feats:
            rankings[q] = []
            continue
        t = time.monotonic()
        cands = voter.search(feats[q].desc, shortlist, neighbours, ratio, exclude=q)
        ranked = rerank(feats[q], cands, ransac_px, verified_score)[:top_k]
        latencies.append(time.monotonic() - t)
        rankings[q] = [m["image_id"] for m in ranked]
        if n % 20 == 0:
            log(f"sift: {n}/{len(queries)} queries")
    return MethodRun(rankings, latencies, ingest_s, len(feats))
