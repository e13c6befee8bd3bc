"""Gateways: the translation layer (packets in, packets out, no I/O), the adapters that
feed it from the kernel and the reactor, and the daemons that wire them together."""
