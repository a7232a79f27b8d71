"""The foundation every role shares: settings, job states, Redis keys, storage, Redis and Celery plumbing.

It imports nothing else of ReconQ.
"""
