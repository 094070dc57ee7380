"""``cirfusion serve``: a JSON API and a web page for searching a catalog by a reference image plus a text.

- :mod:`~cirfusion.serve.catalog`: the loaded model and gallery (index, or exact scoring through the model, fused
  DAFM checkpoints included), the search with the reference left out, additions without a rebuild;
- :mod:`~cirfusion.serve.loading`: building the catalog at start-up from an index or a checkpoint and a folder;
- :mod:`~cirfusion.serve.batcher`: the model thread that answers concurrent searches as one batch;
- :mod:`~cirfusion.serve.explain`: the explanation panel (exact Shapley contributions for DAFM);
- :mod:`~cirfusion.serve.app`: the FastAPI application (routes, limits, token, worker pool) and ``static/``, the page.

See docs/serve.md.
"""

from .app import create_app, image_url
from .catalog import Catalog, Hit, Limits, SearchResult, ServeError
from .explain import explain
from .loading import load_catalog
from .security import TOKEN_ENV, check_binding, is_loopback

__all__ = ["TOKEN_ENV", "Catalog", "Hit", "Limits", "SearchResult", "ServeError", "check_binding", "create_app",
           "explain", "image_url", "is_loopback", "load_catalog"]
