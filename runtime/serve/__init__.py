"""``fila serve``: an OpenAI-compatible chat-completions server on the torch-free runtime.

``schema`` checks a request and turns its messages into a conversation; ``images`` fetches the
images it names (data URLs, or files under an allowed root); ``engine`` runs requests on one
worker thread that owns the pipeline; ``metrics`` keeps Prometheus counters; ``app`` is the
FastAPI application that ties them to HTTP."""
