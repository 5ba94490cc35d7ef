"""Builders of the data sets bundled with the package."""
