"""cirfusion: composed image retrieval (CIR) — DetailFusion, FineCIR, DAFM and their baselines on shared
infrastructure."""

__version__ = "0.1.0"
