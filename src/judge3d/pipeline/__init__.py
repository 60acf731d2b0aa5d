"""Stage drivers: what `stages/*.py` call. The top layer; it wires world, render, generators,
judges, adapt and report together, and generates dvc.yaml stanzas (dvcgen)."""
