"""The HTTP API and the dashboard (FastAPI): jobs, downloads, previews, actions, GPUs, metrics.

``app`` builds it (:func:`reconq.api.app.create_api`); ``deps`` are the routes' typed dependencies;
``schemas`` every model it reads or answers with; ``routes/`` one router per resource; ``problems`` the
error answers and which status each service error gets; ``auth`` passwords, tokens and sessions;
``exports`` DICOM and PNG previews of results; ``prometheus`` the ``/metrics`` text.
"""
