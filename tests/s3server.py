"""A local S3-compatible emulator (moto's server) on 127.0.0.1, for the rclone tests.

moto is an *emulator* of Amazon S3 and IAM, not a storage service: it keeps objects in memory and
enforces IAM policies once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have passed, which is what lets
the tests give rclone a key that may not delete, or may not write.

Run as ``python3 s3server.py PORT``. One fix is made to the emulator, never to ppbackup: moto checks
signatures against the URL as werkzeug decoded it, so a listing with ``prefix=x%2F`` (every rclone
listing of a folder) fails its signature check; the raw request URI is used instead.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.core import responses
from moto.server import main

_setup_class = responses.BaseResponse.setup_class


def _setup_class_with_raw_uri(
    self: responses.BaseResponse, request: Any, full_url: str, headers: Any, **kwargs: Any
) -> None:
    _setup_class(self, request, full_url, headers, **kwargs)
    raw = getattr(request, 'environ', {}).get('RAW_URI') or getattr(request, 'environ', {}).get(
        'REQUEST_URI'
    )
    if raw and '://' in full_url:
        scheme, rest = full_url.split('://', 1)
        self.uri = f'{scheme}://{rest.split("/", 1)[0]}{raw}'


responses.BaseResponse.setup_class = _setup_class_with_raw_uri  # type: ignore[method-assign]

if __name__ == '__main__':
    main(['-H', '127.0.0.1', '-p', sys.argv[1]])
