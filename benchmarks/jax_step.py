"""ssl_jax's side of the speed benchmarks: a method's train state and steps,
built from its Fashion-MNIST config with ssl_jax/train.py's own functions (as
benchmarks/train_step.py builds them).

  train step   the trainer's jitted step: views made on device from the uint8
               batch, forward, backward, update, non-finite guard.
  model step   the same loss, gradient and optimizer update on views made
               beforehand: the model's work alone, as step.py compares it.
"""
from __future__ import annotations

import jax
import optax

from ssl_jax import methods, parallel
from ssl_jax.train import make_train_step, optimizer, state_initializer, state_sharding


class Setup:
    """A method's config, mesh, optimizer and initial state on this host.

    images: (B, H, W, C) uint8, a global batch (only its shape and dtype matter).
    """

    def __init__(self, config, num_train_examples: int, images):
        self.config, self.mesh = config, parallel.make_mesh()
        self.method = methods.get(config.method)
        if hasattr(self.method, "check"):
            self.method.check(config, config.batch_size)
        _, self.schedule, self.tx = optimizer(config, num_train_examples)
        init = state_initializer(config, self.method, self.tx)
        with jax.set_mesh(self.mesh):
            self.state_sh = state_sharding(self.method, jax.eval_shape(init, images), self.mesh)
            self.init = jax.jit(init, out_shardings=self.state_sh)
        self.images = images

    def new_state(self):
        with jax.set_mesh(self.mesh):
            return self.init(self.images)

    def n_params(self, state) -> int:
        return sum(x.size for x in jax.tree.leaves(state["params"]))

    def train_step(self):
        """-> jitted (state, batch) -> (state, metrics), the trainer's own."""
        return make_train_step(self.config, self.method, self.tx, self.schedule, self.mesh,
                               self.state_sh)

    def views(self, images, seed: int = 0) -> dict:
        """The views the method's step would make of these images."""
        with jax.set_mesh(self.mesh):
            make = jax.jit(lambda r, x: self.method.views(r, x, self.config))
            return make(jax.random.key(seed), images)

    def model_step(self):
        """-> jitted (state, views, index) -> (state, loss): value_and_grad of the
        method's loss, the optimizer update and the method's state update; the
        state is donated. No views, no gradient norm, no non-finite guard."""
        method, config, tx = self.method, self.config, self.tx
        base_rng = jax.random.key(config.seed)

        def step(state, views, index):
            rng = jax.random.fold_in(base_rng, state["step"])  # MoCo's shuffle, PIRL's negatives
            grad_fn = jax.value_and_grad(method.loss, has_aux=True)
            (loss, (_, method_state)), grads = grad_fn(
                state["params"], state["method_state"], views, index, rng, config)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                    "method_state": method_state}, loss
        return jax.jit(step, donate_argnums=0)
