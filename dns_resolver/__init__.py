"""``serval dns``: the companion DNS resolver of the client gateway.

Layers, as in the rest of the tree (see docs/resolver.md):

* sans-IO core, time passed in: ``wire`` (query checks, templates, truncation, on top
  of dnslib), ``zone`` (service zones: query in, answer out), ``names`` (the
  NameSource seam), ``allocator`` (virtual addresses; persistence through an injected
  store), ``cache`` (TTLs, negative TTLs), ``policy`` (access list, token buckets),
  ``liveness`` (which names have a live instance, from the routers' views), ``core``
  (one message in, replies and upstream work out), ``config``;
* thin Twisted adapters: ``server`` (UDP/TCP listeners), ``upstream`` (forwarding with
  timeouts and failover), ``gateway_link`` (another daemon's control protocol: the
  gateway's socket, the routers' names view), ``router_names`` (polls the routers), ``store``
  (the mappings file), ``daemon`` (wiring, timers, clean stop);
* ``lab``: the resolver and dnsmasq in lab namespaces (tests, benchmark).
"""
