"""tandem's .proto files and their generated stubs (regenerate with proto/generate.sh).

proto/tandem/internal/v1/worker.proto: the service every worker serves (prefill,
decode, colocated): the router's calls, the KV handoff handshake, the token streams.
"""
