"""Side-by-side benchmarks against the peer libraries (``make bench``); see docs/benchmarks.md."""
