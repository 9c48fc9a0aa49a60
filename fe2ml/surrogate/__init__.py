"""Neural constitutive surrogates (PyTorch): models, training, checkpoints, deployment laws."""
