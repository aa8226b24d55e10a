"""Inference with an exported model: the ensemble, external evaluation and prediction on files."""
