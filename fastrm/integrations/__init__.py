"""Adapters that put fastrm's ops inside other RLHF libraries' own code paths.

* :mod:`fastrm.integrations.trl`: ``patch()`` routes TRL's per-token log-probs, entropies and reward-model loss
  through fastrm (``import fastrm.integrations.trl as ft; ft.patch()``).
* :mod:`fastrm.integrations.verl`: verl's ``core_algos`` / ``torch_functional`` functions with their exact
  signatures, backed by fastrm, and ``register()`` to use them in a verl run.

Neither TRL nor verl is a dependency of fastrm: each adapter imports its library when called.
"""
