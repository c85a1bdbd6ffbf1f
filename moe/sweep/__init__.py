"""Sweeps: the sweep format and its expansion into runs, the runner, and the table report."""
