"""The foundation every role shares: settings, job states, Redis keys, storage, the raw MRD file reader
(``mrdfile``), Redis and Celery plumbing.

It imports nothing else of ReconQ.
"""
