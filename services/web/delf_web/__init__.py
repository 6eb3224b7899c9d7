"""The HTTP/JSON API and web console of DELF search: a client of the gateway's gRPC API."""
