"""Records into training data: the data checker (check), source formats (formats), the packed dataset (dataset) and its on-disk cache (cache)."""
