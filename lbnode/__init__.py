import os

__version__ = "0.1.0"

# gRPC's C core logs every failed TLS handshake on stderr at INFO (a grpc health check of a
# backend with a bad certificate: one line per probe, forever, beside the node's own log
# that already says it once); keep its output to real errors unless the operator asks for more.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
