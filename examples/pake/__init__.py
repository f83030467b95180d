"""The PAKE demo mesh under one control plane: ``make demo`` and ``make demo-tour``."""
