"""The data stages: download, read and clean, near-duplicate removal, split, and the tokenizer."""
