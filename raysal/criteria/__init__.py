"""Training criteria. One class per file; each has a ``configs/criterion/<name>.yaml`` with ``_target_``."""
