"""Names the operator, its CRD and its rendered objects share (one place, no string literals elsewhere)."""

from __future__ import annotations

GROUP = "dgserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DiffusionGemma"
PLURAL = "diffusiongemmas"
SINGULAR = "diffusiongemma"
SHORT_NAMES = ("dg",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# KubeRay (v1.7 CRDs in shared/crds/kuberay/)
RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION}"
RAYSERVICE_KIND = "RayService"
RAYSERVICE_PLURAL = "rayservices"
RAY_VERSION_STRING = "2.60.0"  # the Ray in our image (pyproject pins ray[serve]==2.60.0)

# Labels and annotations on everything the operator renders.
MANAGER = "dgserve-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_OWNER = f"{GROUP}/diffusiongemma"
ANNOTATION_SPEC_HASH = f"{GROUP}/rendered-hash"

# kopf's own bookkeeping goes to annotations under our prefix, never to .status (pruning pitfall).
KOPF_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"

# Serve deployment names of the dgserve application (dgserve.serving.app binds them).
DIFFUSION_DEPLOYMENT = "DiffusionReplica"
FALLBACK_DEPLOYMENT = "AutoregressiveFallback"
ROUTER_DEPLOYMENT = "Router"

# Ray worker group names.
DIFFUSION_GROUP = "diffusion"
FALLBACK_GROUP = "fallback"

# Mount points inside Ray pods.
MODELS_DIR = "/models"
FALLBACK_MODELS_DIR = "/fallback-models"
FALLBACK_API_KEY_ENV = "DGSERVE_FALLBACK_API_KEY"

# The gRPC front (TLS, tokens, limits) beside Ray's gRPC proxy in every Ray pod (docs/security.md).
FRONT_CONTAINER = "grpc-front"
PROXY_PORT = 9099  # Serve's gRPC proxy behind the front (PROXY_PORT_ALT when grpcPort takes it)
PROXY_PORT_ALT = 9098
TLS_DIR = "/etc/dgserve/tls"
CLIENT_CA_DIR = "/etc/dgserve/client-ca"
AUTH_DIR = "/etc/dgserve/auth"
AUTH_TOKEN_FILE = "token"
TMP_DIR = "/tmp"
RUN_AS_USER = 1000  # every rendered container runs as this non-root user, read-only root filesystem
