"""A training loop written with ``strategy.run``: the same step under every strategy.

Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585); this
loop does not depend on Keras's distributed data handling. It calls the same Keras
callbacks (``on_epoch_end(epoch, logs)`` etc.), computes the compiled loss and metrics
(``model.compute_loss`` / ``model.compute_metrics``) and logs the same keys as ``fit``
(``loss``, metrics, ``val_`` + each).

Loss scaling across replicas
----------------------------
Each replica computes the loss of its share of the global batch. Keras losses return
their per-replica mean already divided by the number of replicas (and medseg's batch-Dice
losses all-reduce their statistics and do the same), so the sum of the replicas' gradients,
which the optimizer all-reduces, is the gradient of the global-batch loss.

Clipping
--------
``clip_norm`` bounds the norm of the *global* gradient, over all variables and all
replicas: the gradients are all-reduced first, clipped, and handed to the optimizer divided
by the replica count (the optimizer sums them again). With a ``LossScaleOptimizer`` the
norm is measured on the unscaled gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from medseg.progress import keras_verbose


def _clip(grads, clip_norm: float, optimizer, replicas: int):
    if replicas > 1:
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
    scale = 1.0
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scale = tf.cast(optimizer.dynamic_scale, tf.float32)
    norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in grads]) / scale
    factor = clip_norm / tf.maximum(norm, clip_norm)  # ≤ 1; NaN grads stay NaN (skipped)
    return [g * tf.cast(factor / replicas, g.dtype) for g in grads]


def custom_fit(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    epochs: int,
    steps_per_epoch: int,
    initial_epoch: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    clip_norm: float | None = None,
    verbose: int | None = None,
    augment=None,
) -> dict[str, list[float]]:
    """Train a compiled ``model`` under its strategy, epochs ``initial_epoch`` … ``epochs - 1``.

    Parameters
    ----------
    model : keras.Model
        Compiled inside the strategy's scope.
    train : tf.data.Dataset
        Endless batches of the *global* batch size; distributed with
        ``strategy.experimental_distribute_dataset`` (under MultiWorkerMirroredStrategy,
        every worker reads the same seeded stream and keeps its replicas' share of each
        batch, ``AutoShardPolicy.DATA``).
    validation : tf.data.Dataset, optional
        Finite batches evaluated after every epoch.
    callbacks : sequence of keras.callbacks.Callback
        Keras callbacks, called as ``fit`` calls them; ``model.stop_training`` ends training.
    clip_norm : float, optional
        Bound of the global gradient norm.
    verbose : int, optional
        Keras's progress display, as ``fit``'s: 1 a bar of the epoch's steps with ETA, 2 a
        line per epoch, 0 none; default :func:`medseg.progress.keras_verbose`.
    augment : callable, optional
        ``(x, y, step, first) -> (x, y)`` applied to each replica's share of global batch
        ``step`` (its patches from ``first`` on) inside the compiled step, before the
        forward pass (:class:`medseg.pipeline.batched.BatchAugmentation`,
        ``augment.device="accelerator"``).

    Returns
    -------
    dict
        Logs of the epochs run here, metric name → one value per epoch.
    """
    strategy = model.distribute_strategy
    optimizer = model.optimizer
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        loss_tracker = keras.metrics.Mean(name="loss")
        val_loss_tracker = keras.metrics.Mean(name="loss")
        model._symbolic_build(data_batch=train.element_spec)  # compiled loss/metrics state
        if not optimizer.built:
            optimizer.build(model.trainable_variables)

    def train_step(batch, step):
        x, y = batch
        if augment is not None:
            # the global batch is split over the replicas in order
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            x, y = augment(x, y, step, tf.cast(replica, tf.int32) * tf.shape(x)[0])
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = optimizer.scale_loss(loss)
        # the loss is this replica's share (÷ replicas); track the replica's own mean
        loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(x)[0])
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if clip_norm is not None:
            grads = _clip(grads, clip_norm, optimizer, replicas)
        optimizer.apply(grads, variables)
        model.compute_metrics(x, y, y_pred, sample_weight=None)

    def test_step(batch):
        x, y = batch
        y_pred = model(x, training=False)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        val_loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(x)[0])
        model.compute_metrics(x, y, y_pred, sample_weight=None)

    @tf.function
    def distributed_train_step(batch, step):
        strategy.run(train_step, args=(batch, step))

    @tf.function
    def distributed_test_step(batch):
        strategy.run(test_step, args=(batch,))

    def results(tracker) -> dict[str, float]:
        logs = {k: v for k, v in model.get_metrics_result().items() if k != "loss"}
        logs = {"loss": tracker.result(), **logs}
        return {k: float(v) for k, v in logs.items()}

    if verbose is None:
        verbose = keras_verbose()
    # Keras's ProgbarLogger, as in fit: it reads the verbose, epochs and steps given here
    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=False,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    train_iterator = iter(strategy.experimental_distribute_dataset(train))
    val_data = None if validation is None else strategy.experimental_distribute_dataset(validation)
    history: dict[str, list[float]] = {}
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        loss_tracker.reset_state()
        callback_list.on_epoch_begin(epoch)
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            # the global step as a tensor: one trace for every step
            global_step = tf.constant(epoch * steps_per_epoch + step, tf.int64)
            distributed_train_step(next(train_iterator), global_step)
            callback_list.on_train_batch_end(step)
        logs = results(loss_tracker)
        if val_data is not None:
            model.reset_metrics()
            val_loss_tracker.reset_state()
            callback_list.on_test_begin()
            for step, batch in enumerate(val_data):
                callback_list.on_test_batch_begin(step)
                distributed_test_step(batch)
                callback_list.on_test_batch_end(step)
            val_logs = results(val_loss_tracker)
            callback_list.on_test_end(val_logs)
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        callback_list.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        if model.stop_training:
            break
    callback_list.on_train_end(logs=None)
    return history
