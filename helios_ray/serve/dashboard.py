"""The live page's static files (``helios_ray/assets/dashboard/``), served by the Router at ``/dashboard``.

The files carry no data, so they are served without the API key; the page fetches everything it shows from
``/v1/helios/status`` (which needs the key when one is set) and asks the user for the key on a 401.  Plain
HTML + JS + CSS, shipped in the package: no CDN, no build step - works air-gapped.  Only the files listed in
``FILES`` are served (no path is ever joined from user input).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi.responses import Response

FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Scripts and styles only from this origin (no inline script), data only from the API, images only inline SVG.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


@lru_cache(maxsize=None)
def read(name: str) -> bytes:
    if name not in FILES:
        raise KeyError(name)
    return resources.files("helios_ray").joinpath("assets", "dashboard", name).read_bytes()


def response(name: str) -> Response:
    if name not in FILES:
        return Response(b"not found\n", status_code=404, media_type="text/plain", headers=HEADERS)
    return Response(read(name), media_type=FILES[name], headers=HEADERS)
