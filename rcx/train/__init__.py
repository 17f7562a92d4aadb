"""Training: the RL trainer behind ``rcx train`` and the supervised warm start of builtin:tiny."""
