"""ssl_jax's side of the speed benchmarks: a method's train state and steps,
built from its Fashion-MNIST config by the setup layer the trainer uses
(ssl_jax/experiment.py), as benchmarks/train_step.py builds them.

  train step   the trainer's jitted step: views made on device from the uint8
               batch, forward, backward, update, non-finite guard.
  model step   the same loss, gradient and optimizer update on views made
               beforehand: the model's work alone, as step.py compares it.
"""
from __future__ import annotations

import jax
import optax

from ssl_jax import experiment, parallel
from ssl_jax.dataspec import DataSpec


class Setup:
    """A method's config, mesh, optimizer and initial state on this host.

    images: (B, H, W, C) uint8, a global batch (only its shape and dtype matter).
    """

    def __init__(self, config, num_train_examples: int, images):
        self.config, self.mesh = config, parallel.make_mesh()
        spec = DataSpec(num_examples=num_train_examples, image_shape=tuple(images.shape[1:]))
        self.exp = experiment.Experiment(config, spec, self.mesh)
        self.method, self.tx, self.spec = self.exp.method, self.exp.tx, spec
        self.images = images

    def new_state(self):
        return self.exp.initial_state()

    def n_params(self, state) -> int:
        return sum(x.size for x in jax.tree.leaves(state["params"]))

    def train_step(self):
        """-> jitted (state, batch) -> (state, metrics), the trainer's own."""
        return self.exp.train_step()

    def views(self, images, seed: int = 0) -> dict:
        """The views the method's step would make of these images."""
        with jax.set_mesh(self.mesh):
            make = jax.jit(lambda r, x: self.method.views(r, x, self.config))
            return make(jax.random.key(seed), images)

    def model_step(self):
        """-> jitted (state, views, index) -> (state, loss): value_and_grad of the
        method's loss, the optimizer update and the method's state update; the
        state is donated. No views, no gradient norm, no non-finite guard."""
        method, config, tx, spec = self.method, self.config, self.tx, self.spec
        base_rng = jax.random.key(config.seed)

        def step(state, views, index):
            rng = jax.random.fold_in(base_rng, state["step"])  # MoCo's shuffle, PIRL's negatives
            grad_fn = jax.value_and_grad(method.loss, has_aux=True)
            (loss, (_, method_state)), grads = grad_fn(
                state["params"], state["method_state"], views, {"index": index}, rng, config,
                spec)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                    "method_state": method_state}, loss
        return jax.jit(step, donate_argnums=0)
