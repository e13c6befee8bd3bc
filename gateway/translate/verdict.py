"""The translator's verdict for a packet it leaves alone."""

PASS = object()  # accept the packet unchanged
