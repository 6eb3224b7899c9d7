"""DELF extractor service: dense local features of photos.

models (presets) and backbones (networks), extract (the pipeline), pca (the descriptor PCA
artifact) and fit_pca (the ``delf fit-pca`` command), memory (CPU malloc settings), and the
worker: tasks (Celery tasks), batcher (batched forward passes), sources (ingest paths/URLs).
"""
from delf_extractor.models import MODEL_CONFIGS, ModelConfig, get_config

__all__ = ["MODEL_CONFIGS", "ModelConfig", "get_config", "DelfExtractor"]


def __getattr__(name):  # DelfExtractor imports torch; keep `import delf_extractor` light
    if name == "DelfExtractor":
        from delf_extractor.extract import DelfExtractor

        return DelfExtractor
    raise AttributeError(name)
