"""The Keras model."""
