"""Window converters for the sequence datasets: recordings with dense labels or flow -> labelled event windows."""
