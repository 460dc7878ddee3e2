"""Model-specific preprocessing: coverage of image tokens by segments, encoding, collation."""
