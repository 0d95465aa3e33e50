"""Bridges to other tools' interfaces (optional extras; nothing here is imported by the
rest of the package): :mod:`simsteer.integrations.lm_eval` is the model adapter for
lm-evaluation-harness (``pip install 'simsteer[lmeval]'``)."""
