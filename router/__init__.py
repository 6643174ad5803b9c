"""tandem's router: the front door, in front of prefill, decode and colocated workers.

    core.py            Router: picks instances, sends requests, streams tokens back in order
    policy.py          routing policies (which prefill, which decode), plain Python
    load.py            the workers' load and step times, as the policies read them
    metrics.py         Prometheus metrics
    instances.py       the workers as the router sees them; the token stream to each
    streams.py         one request's reorder buffer
    tokenizer.py       tokenizer and chat template from a worker's Info, without torch
    frontend.py        what both APIs share: checks, sampling params, gathering a completion
    http.py            the OpenAI-compatible HTTP API (openai_protocol.py: its bodies)
    grpc_api.py        the public gRPC API, proto/tandem/v1/tandem.proto
    server.py          both APIs in one asyncio loop; `python -m router` runs it

The router never imports torch or transformers.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tandem")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
