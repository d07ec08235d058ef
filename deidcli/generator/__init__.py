"""The generator: model.py (nn.Modules and checkpoints only), engine.py (batched inference,
device and runtime), embedder.py (the identity check's embedder), identity.py (MobileFaceNet in
torch, for training and evaluation)."""
