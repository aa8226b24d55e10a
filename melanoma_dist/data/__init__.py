"""Data stages: label sources, image preparation, Parquet shards, ingest, folds, tf.data pipeline."""
