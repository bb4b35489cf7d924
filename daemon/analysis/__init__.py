"""Analysis of the tag stream: counts now; coincidences, histograms and statistics build on the same shape."""
