"""Fuzzing harnesses for the protocol core, the translators, the router and the resolver.

Each target (``fuzz.targets.TARGETS``) generates one input from a random source and runs
it with its properties checked; anything that escapes ``Target.run`` is a finding.
``python -m fuzz.run`` runs them long (built-in engine, or atheris); ``tests/fuzz/``
runs them short under Hypothesis in CI.
"""
