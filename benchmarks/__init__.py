"""Speed and memory benchmarks of seg_densenet: ``python -m benchmarks.run`` (see benchmarks/run.py)."""
