"""The inference service (FastAPI gateway + micro-batching worker); see the service issue."""
