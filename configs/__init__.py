"""rlopt's Hydra configs (YAML), shipped as package data: rlopt.resources.config_dir() finds them."""
