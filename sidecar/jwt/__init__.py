"""JWT authentication, split as Envoy's jwt_authn is: ``extractor`` (where the token is),
``jwks`` (key sets and the cache that refreshes them), ``fetch`` (the tiny HTTPS client the
cache uses), ``verifier`` (the checks) and ``authenticator`` (provider choice and the
verified-token cache). Imported only when a JWT provider is configured: it loads PyJWT.
"""

from __future__ import annotations

__all__: list[str] = []
