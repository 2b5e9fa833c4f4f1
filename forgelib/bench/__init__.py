"""Benchmarks behind `forge bench NAME`; each module has main(argv) -> int and prints JSON."""
