"""Numerics every backend shares: precision rules, the recurrence helpers, the projection folding
and the counter-based dropout. Imports nothing else of the package."""
