"""rlopt: composable policy optimisation (GRPO, GSPO, DAPO, Dr. GRPO, RLOO, CISPO) for LMs."""

__version__ = "0.1.0"
