"""Video: streamed, sampled decoding (decode.py), per-face tracks (track.py),
smoothed expressions (smooth.py), and the analysis that joins them over the
serving engine's Analyzer (analyze.py)."""
