"""melanoma-dist: distributed Keras CNN training for melanoma detection.

Ingest images into Parquet shards, split them into lesion-grouped folds, and train
each fold data-parallel with Horovod while Ray schedules the folds.
"""

__version__ = "0.1.0"
