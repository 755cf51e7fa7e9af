"""The data path: shard lists -> robust decoding -> batches (WebDataset)."""
