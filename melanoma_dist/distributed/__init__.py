"""Data-parallel training of one fold with Horovod, for Keras 3 on TensorFlow.

`horovod_keras` replaces the parts of `horovod.tensorflow.keras` 0.28.1 that are
broken with Keras 3 (TensorFlow 2.16+): its `DistributedOptimizer` does not
average gradients under `model.fit`, and its broadcast callbacks fail on Keras 3
variables. Everything here is built on `horovod.tensorflow` collectives only.

One code path serves 1 and N processes: a plain `python` process that calls
`init_worker()` is a Horovod world of size 1. Launch N workers with
`horovodrun -np N --gloo -H localhost:N python train.py` (CPU) or
`horovodrun -np N -H host1:4,host2:4 python train.py` (NCCL on GPU hosts), or
from Python with `horovod.run(fn, np=N, use_gloo=True)`.

Example:

```python
from melanoma_dist.distributed import horovod_keras as hk

ctx = hk.init_worker()
model = build_model(cfg.model)
model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(lr)), loss=...,
              jit_compile=False)  # Horovod ops do not run under XLA
hk.broadcast_model(model)
callbacks = [hk.MetricAverageCallback(), hk.WarmupScaledLR(lr, warmup_epochs=1),
             keras.callbacks.ReduceLROnPlateau(), keras.callbacks.EarlyStopping()]
model.fit(train_ds, steps_per_epoch=hk.min_over_ranks(local_steps), callbacks=callbacks,
          verbose=cfg.train.verbose if ctx.is_chief else 0)
```
"""
