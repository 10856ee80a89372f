"""Benchmarks behind ``lightning-bagpipe bench SUITE``; each module has ``add_arguments`` and ``run``."""
