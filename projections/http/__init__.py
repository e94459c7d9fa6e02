"""The HTTP read API (``api``, Litestar), its token (``auth``) and its OpenAPI route list
(``apidocs``)."""
