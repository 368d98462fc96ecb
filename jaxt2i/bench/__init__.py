"""Benchmarks (`python -m jaxt2i.bench`): train/sample speed, compile time, MFU, memory, and the
same work in imagen-pytorch for ratios measured in one run. See BENCHMARKS.md."""
