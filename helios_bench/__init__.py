"""Benchmarks that print side-by-side ratios: ``helios-ray bench engine|memory|mixed|serve``.

Above everything: they drive the server (helios_ray) with the load generator (loadgen) and score the answers, so
they live beside both packages and plug into the ``helios-ray`` command through an entry point.
"""
