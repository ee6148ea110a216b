"""What a dataset answer's part URLs become on their way to a caller (docs/design.md §11, "Downloads").

``PartLinks`` is the one decision the dataset routes call on every answer
(get and list, cached or not): ``DirectLinks`` (``datasets.downloads:
direct``) passes the upstream's URLs through; the gateway's signed links
(``datasets.downloads: gateway``) replace them.
"""

from __future__ import annotations

from typing import Any, Protocol


class PartLinks(Protocol):
    def rewrite(self, dataset: dict[str, Any], *, caller: str, base_url: str) -> dict[str, Any]:
        """``dataset`` (one dataset object) with its parts' ``url`` and ``original_url`` as ``caller`` may use them.

        ``base_url`` is how this caller reaches the gateway (``server.public_url``,
        else ``http://`` and the request's Host). Never changes ``dataset`` in place.
        """
        ...


class DirectLinks:
    """``datasets.downloads: direct``: the upstream's part URLs, unchanged."""

    def rewrite(self, dataset: dict[str, Any], *, caller: str, base_url: str) -> dict[str, Any]:
        return dataset
