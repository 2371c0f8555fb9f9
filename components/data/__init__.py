"""Data: sources, image preprocessing, WebDataset shard IO, Parquet token IO."""
