"""Verifier service: RANSAC geometric verification of shortlisted candidates (queue ``<prefix>.verify``).

Run: ``celery -A delf_verifier.tasks worker -Q <prefix>.verify`` (prefork or threads).
"""
