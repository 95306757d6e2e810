"""gpumix benchmarks: warm up, time with perf_counter (CUDA events on a GPU),
report median and spread, and write machine, versions and commit beside the
numbers."""
