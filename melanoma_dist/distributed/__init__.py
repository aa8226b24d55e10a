"""Data-parallel training of one fold with Horovod, for Keras 3 on TensorFlow.

This package replaces the parts of `horovod.tensorflow.keras` 0.28.1 that are
broken with Keras 3 (TensorFlow 2.16+): its `DistributedOptimizer` does not
average gradients under `model.fit`, and its broadcast callbacks fail on Keras 3
variables. Everything here is built on `horovod.tensorflow` collectives only.
Each worker process trains a replica of the model on its own shard of every
global batch; gradients are averaged before every update and BatchNorm
statistics before every validation, so the replicas stay identical.

Modules, one job each (their public names are re-exported here):

- `worker`: join the job, pin the GPU, this rank's seed (`init_worker`, `WorkerContext`).
- `optimizer`: the gradient-averaging optimizer (`distributed_optimizer`, `build_optimizer`).
- `collectives`: broadcast, average and gather variables and arrays (`broadcast_model`, `allgather_rows`).
- `batchnorm_sync`: average BatchNorm moving statistics (`sync_batchnorm_statistics`).
- `metric_average`, `warmup_lr`: the callbacks `MetricAverageCallback` and `WarmupScaledLR`.

One code path serves 1 and N processes: a plain `python` process that calls
`init_worker()` is a Horovod world of size 1. Launch N workers with
`horovodrun -np N --gloo -H localhost:N python train.py` (CPU) or
`horovodrun -np N -H host1:4,host2:4 python train.py` (NCCL on GPU hosts), or
from Python with `horovod.run(fn, np=N, use_gloo=True)`.

Example:

```python
from melanoma_dist import distributed as hk

ctx = hk.init_worker()
model = build_model(cfg.model, size, classes, seed=seed, dropout_seed=ctx.rank_seed(seed))
model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(lr)), loss=...,
              jit_compile=False)  # Horovod ops do not run under XLA
hk.broadcast_model(model)
callbacks = [hk.MetricAverageCallback(), hk.SyncBatchNormStatistics(), hk.WarmupScaledLR(lr, warmup_epochs=1),
             keras.callbacks.ReduceLROnPlateau(), keras.callbacks.EarlyStopping()]
model.fit(train_ds, validation_data=val_ds, steps_per_epoch=steps, callbacks=callbacks,
          verbose=cfg.train.verbose if ctx.is_chief else 0)
```
"""

from melanoma_dist.distributed.batchnorm_sync import (SyncBatchNormStatistics, batchnorm_statistics,
                                                      sync_batchnorm_statistics)
from melanoma_dist.distributed.collectives import (allgather_rows, average_variables, barrier, broadcast_model,
                                                   broadcast_object, broadcast_variables)
from melanoma_dist.distributed.metric_average import MetricAverageCallback
from melanoma_dist.distributed.optimizer import (average_gradients, build_optimizer, check_compiled_model,
                                                 distributed_optimizer)
from melanoma_dist.distributed.warmup_lr import WarmupScaledLR
from melanoma_dist.distributed.worker import WorkerContext, init_worker, select_gpu, shutdown

__all__ = [
    "MetricAverageCallback", "SyncBatchNormStatistics", "WarmupScaledLR", "WorkerContext", "allgather_rows",
    "average_gradients", "average_variables", "barrier", "batchnorm_statistics", "broadcast_model",
    "broadcast_object", "broadcast_variables", "build_optimizer", "check_compiled_model", "distributed_optimizer",
    "init_worker", "select_gpu", "shutdown", "sync_batchnorm_statistics",
]
