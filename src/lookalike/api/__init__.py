"""The REST API for shops (FastAPI). Calls the pipeline (`Catalog`) only.

    lookalike serve --catalog DIR [--host 127.0.0.1] [--port 8000]

Reads: POST /search, GET /products/{id}, GET /products/{id}/image/{n}, GET /health, GET /stats, GET /tune.
Writes (need `Authorization: Bearer $LOOKALIKE_API_TOKEN`; off when no token is configured):
POST /products, DELETE /products/{id}, POST /tune. Every error is a JSON body {"error": "..."}.

One module per concern: `settings` (what an operator sets), `schemas` (bodies and answers), `service`
(what routes share, auth), `errors` (error answers), `gate` (body size and token, before a body is
read), `bodies` (a form route with `UploadFile`/`Form` and a JSON route per endpoint, chosen by content
type), and a router per resource: `search`, `products`, `tuning`, `health`; `app` puts them together.
"""

from lookalike.api.app import create_app, serve
from lookalike.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app", "serve"]
