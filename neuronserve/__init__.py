"""neuronserve: serve Llama-family models on AWS Inferentia2/Trainium, and the same code on CPU.

Heavy parts (torch, transformers) load lazily, so ``import neuronserve.core`` needs no torch.
"""

__version__ = "0.1.0"
