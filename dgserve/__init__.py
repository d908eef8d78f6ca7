"""dgserve: serving for block-diffusion language models (DiffusionGemma).

Subpackages: ``dgserve.engine`` (PyTorch block-diffusion engine), ``dgserve.serving``
(Ray Serve replicas, gRPC router, local mode), ``dgserve.operator`` (kopf operator).
"""

__version__ = "0.1.0"
