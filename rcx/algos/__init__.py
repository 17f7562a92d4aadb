"""The math of RL with rollout correction: pure functions on tensors.

:mod:`~rcx.algos.criteria` (the rejection criteria and their threshold grammar, torch-free),
:mod:`~rcx.algos.correction` (IS weights, RS masks, ``rollout_corr/*`` metrics),
:mod:`~rcx.algos.losses` (policy, value, entropy, KL), :mod:`~rcx.algos.advantages`.
Nothing here imports the config tree; this package file imports nothing, so the torch-free
criteria can be used by ``rcx validate`` without loading torch.
"""
