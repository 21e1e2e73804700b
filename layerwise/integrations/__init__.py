"""Adapters that log an optimizer's watched values (trust ratios) through a
trainer's own logging.

* :mod:`layerwise.integrations.hf`: a ``transformers.TrainerCallback``
  (extra ``layerwise[hf]``).
* :mod:`layerwise.integrations.lightning`: a ``lightning.pytorch.Callback``
  (extra ``layerwise[lightning]``).

Both read ``optimizer.watched`` (``lw.Optimizer`` or ``lw.adapt``; see
``lw.Optimizer``'s ``watch=`` and ``record=``) through
:func:`layerwise.integrations.watched.latest_values`. Importing this package
imports neither library.
"""
