"""The project's benchmarks, run from the repository root as modules (``python -m benchmarks.mechanism``,
``python -m benchmarks.serve_sweep``, ``python -m benchmarks.lane_overlap``), so that they and the tests import
``benchmarks.mechanism_lib`` without touching ``sys.path``."""
