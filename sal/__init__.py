"""The Serval protocol core: wire codecs, service table, flows and their state machine.

Nothing in this package performs I/O: bytes and events go in, objects and actions come
out, and time is always an argument.
"""
