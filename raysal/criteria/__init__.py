"""Training criteria. One class per file; each has a ``configs/criterion/<name>.yaml`` with ``_target_``.

What a criterion has and offers: `raysal.criteria.protocol`; what the step hands it: `raysal.criteria.inputs`."""
