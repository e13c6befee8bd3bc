"""The service router: learns registrations, forwards SAL SYNs to live instances.

- :mod:`router.core`: sans-IO core (registrations and SYNs in, verdicts and replies out).
- :mod:`router.registry`: registrations kept in the service table, with expiry.
- :mod:`router.rewrite`: the SYN rewrite (destination, SOURCE extension, checksums).
- :mod:`router.config`: the router's TOML config; :mod:`router.daemon`: the Twisted wiring.
"""
