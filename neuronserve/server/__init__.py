"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): ``create_app`` and ``neuronserve serve``."""
