"""Thin adapters between the kernel or reactor and the translators: each only converts."""
