"""Aggregation and reporting of cross-validation results."""
