"""Runtime adapters. Each submodule imports its framework at the top; this package imports none."""
