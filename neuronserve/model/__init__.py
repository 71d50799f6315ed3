"""The Llama-family model, weight loading and tokenization (needs torch and transformers)."""
