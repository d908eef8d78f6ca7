"""Generated gRPC stubs of the dgserve v1 API (``python -m dgserve.serving.protos``); do not edit."""
