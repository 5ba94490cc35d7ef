"""Learning experiments behind docs/RESULTS.md and their summaries and plots."""
