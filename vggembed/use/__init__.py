"""Using embeddings: similarity, approximate indexes, search/dedup/cluster, contact sheets and pictures."""

# Near-duplicates (re-encodes, resizes, crops of a few percent) of real photos
# stay above this fc2 cosine and distinct photos below it; see docs/search.md
# ("The default threshold, 0.95") and benchmarks/dedup_threshold.py for the figures.
# Here rather than in `explore`, so that the CLI shows it without importing numpy.
DEFAULT_THRESHOLD = 0.95
