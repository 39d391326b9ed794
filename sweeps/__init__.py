"""rlopt's sweep configs (YAML), shipped as package data: rlopt.resources.sweeps_dir() finds them."""
