"""DELF extractor service: dense local features of photos (see extract.py), the PCA
artifact (pca.py) and the Celery tasks of the extract queue (tasks.py)."""
from delf_extractor.models import MODEL_CONFIGS, ModelConfig, get_config

__all__ = ["MODEL_CONFIGS", "ModelConfig", "get_config", "DelfExtractor"]


def __getattr__(name):  # DelfExtractor imports torch; keep `import delf_extractor` light
    if name == "DelfExtractor":
        from delf_extractor.extract import DelfExtractor

        return DelfExtractor
    raise AttributeError(name)
