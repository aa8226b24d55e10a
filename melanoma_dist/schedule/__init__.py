"""Cross-validation folds scheduled on Ray."""
