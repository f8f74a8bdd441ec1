"""TLS termination: certificates (``certs``), contexts per listener, the TLS stream of the data plane."""
