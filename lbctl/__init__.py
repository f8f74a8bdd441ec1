import os

__version__ = "0.1.0"

# gRPC's C core logs a failed TLS handshake on stderr before lbctl can print its own
# one-line error; keep its output to real errors unless the operator asks for more.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
