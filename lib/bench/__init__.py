"""Benchmarks and the GPU check: the cases and goals (cases.py), measuring (suite.py, throughput.py,
download.py, gpu_check.py) and rendering the results into docs/benchmarks.md (render.py)."""
