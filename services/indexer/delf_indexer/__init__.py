"""Indexer service: DELF descriptors in Milvus, nearest-neighbour votes (Celery queue ``<prefix>.index``).

Run: ``celery -A delf_indexer.tasks worker -Q <prefix>.index --pool solo`` (Milvus Lite
lives inside the worker process, so one process per Lite file; with a Milvus server
any number of workers and pools may run).
"""
