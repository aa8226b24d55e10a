"""`melanoma-dist tune`: hyperparameter search with Ray Tune over cross-validated trials.

- `space.py`       the `tune.space` section: keys, distributions, checks at config load
- `resources.py`   what a trial reserves: its folds' Horovod workers, in one placement group
- `trial.py`       the trainable: one cross-validation, reported per epoch, stoppable
- `outer.py`       the outer split: the outer training part as a dataset of its own
- `experiment.py`  the Tuner (new or restored), the outer folds, the retraining of the best config
- `results.py`     the trials table, the best config as YAML, the summary
- `progress.py`    one plain log line per trial result and the running best
"""
