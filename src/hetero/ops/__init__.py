"""Below the model: tensor-level operations — linear layers per precision, the embedding table and
the compiled kernels. Nothing here knows a model architecture or the runtime; the model builds on it."""
