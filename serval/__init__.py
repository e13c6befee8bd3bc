"""The ``serval`` command: one entry point for every daemon and tool."""
