"""The math of RL with rollout correction: pure functions on tensors.

:mod:`~rcx.algos.criteria` (the rejection criteria and their threshold grammar, torch-free),
:mod:`~rcx.algos.correction` (IS weights, RS masks, ``rollout_corr/*`` metrics),
:mod:`~rcx.algos.losses` (policy, value, entropy, KL), :mod:`~rcx.algos.advantages`, and
:mod:`~rcx.algos.modes` (which anchor, which loss, where the IS weights go; torch-free).
``compute_rollout_correction`` (string settings, for library users) lives in
:mod:`rcx.algos.correction` and is re-exported as ``rcx.correction.compute_rollout_correction``.
Nothing here imports the config tree; this package file imports nothing, so the torch-free
criteria can be used by ``rcx validate`` without loading torch.
"""
