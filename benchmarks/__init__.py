"""fastrm's benchmarks (not installed with the package): one script per op on a shared harness.

Run from the repository root with ``python -m benchmarks`` (or ``fastrm bench``); see README.md here.
"""
