"""Per-level RPN: one head shared across pyramid levels, per-level proposal selection."""
