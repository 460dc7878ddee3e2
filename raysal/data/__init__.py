"""COCONut data layer: on-disk layout, reading, validation, synthetic data, parquet shards.

Everything here is plain Python/NumPy/Pillow/pyarrow; only `raysal.data.ray_dataset` imports Ray.
"""
