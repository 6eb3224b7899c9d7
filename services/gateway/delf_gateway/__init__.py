"""The gRPC gateway service (public API delf.v1.ImageSearch)."""
