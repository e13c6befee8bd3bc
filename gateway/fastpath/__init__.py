"""The kernel fast path: established flows translated by a tc-BPF program.

``bpf/serval_tc.c`` is the program, ``bpf/fastpath.h`` the maps it shares with
``maps.py``; ``libbpf.py`` loads it, ``tc.py`` attaches it, ``manager.py`` keeps the
kernel's flows in step with the translator's events.
"""
