"""The HTTP API and the dashboard (FastAPI): jobs, downloads, previews, actions, GPUs, metrics."""
