"""The web explorer: a FastAPI app over one loaded run (`vaedraw serve RUN_DIR`).

    app = create_app(run)          # TestClient(app) in tests; uvicorn in `serve`

The page (web_static/: plain HTML, CSS and JS, no build step, nothing fetched from elsewhere) moves
through the latent space with sliders, draws from the run's sampler, interpolates between digits and
encodes a digit drawn with the mouse. The JSON API it uses is documented in docs/WEB.md; every body is
validated by a pydantic model and every bad request gets a 4xx with a message.

Sliders move coordinates c in a `latent.Basis`: the latent axes when D <= MAX_AXES, else the leading
principal directions of the test-set encoder means (z = mean + sum_i c_i std_i dir_i). The page
computes z from the basis it is sent; the server takes and returns full codes z [D].
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from . import latent, plots
from .errors import VaedrawError

STATIC_DIR = Path(__file__).resolve().parent / "web_static"
MAX_BODY = 64 * 1024  # bytes; the largest legitimate body (a 96x96 drawing) is about 40 KB
Z_BOUND = 50.0  # |z_i| above this is refused: codes of trained models stay within a few units
MAX_AXES = 16  # one slider per latent dimension up to this size, else principal directions
N_MAP = 2000  # test images placed on the latent map
DRAW_MIN, DRAW_MAX = 28, 96  # side of the square drawing the page sends
MAX_STEPS = 32  # interpolation points

Finite = Annotated[float, Field(allow_inf_nan=False, ge=-Z_BOUND, le=Z_BOUND)]
Pixel = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1.0)]
Digit = Annotated[StrictInt, Field(ge=0, le=9)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecodeRequest(_Body):
    z: list[Finite] = Field(max_length=4096)
    digit: Digit | None = None


class RandomRequest(_Body):
    digit: Digit | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None


class EncodeRequest(_Body):
    pixels: list[Pixel] = Field(min_length=DRAW_MIN ** 2, max_length=DRAW_MAX ** 2)
    digit: Digit | None = None


class InterpolateRequest(_Body):
    from_digit: Digit
    to_digit: Digit
    steps: Annotated[StrictInt, Field(ge=2, le=MAX_STEPS)] = 10


class BadRequest(VaedrawError):
    """A well-formed body that does not fit this run (wrong code length, a digit it cannot use)."""


def png_base64(x: torch.Tensor) -> str:
    """One image [1, 28, 28] (or [28, 28]) in [0, 1] -> base64 of a grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(plots.to_uint8(x.reshape(1, 28, 28))[0], mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Explorer:
    """What the app knows about its run: the slider basis, the latent map, the interpolation endpoints.

    Model calls are serialized by a lock: each is a millisecond, and concurrent calls would only
    compete for the same cores.
    """

    def __init__(self, run, data_dir: str | Path | None = None, n_map: int = N_MAP):
        self.run = run
        self.lock = threading.Lock()
        test = latent.load_test_split(run, data_dir)
        self.test_images, self.test_labels = test.images, test.labels
        mu, labels = latent.encoder_means(run, test.images, test.labels, n_map)
        self.projection = latent.Projection.fit(mu, "pca")
        self.map_labels = labels
        d = run.latent_dim
        self.basis = latent.Basis.axes(d) if d <= MAX_AXES else latent.Basis.principal(mu, MAX_AXES)

    # --------------------------------------------------------------- checks
    def label(self, digit: int | None) -> torch.Tensor | None:
        if self.run.conditional:
            if digit is None:
                raise BadRequest("this model is conditional: give a digit 0-9")
            if digit >= self.run.model.n_classes:
                raise BadRequest(f"digit must be in 0..{self.run.model.n_classes - 1}")
            return torch.tensor([digit])
        if digit is not None:
            raise BadRequest("this model is not conditional: leave digit out")
        return None

    def code(self, z: list[float]) -> torch.Tensor:
        if len(z) != self.run.latent_dim:
            raise BadRequest(f"z must have {self.run.latent_dim} numbers, got {len(z)}")
        return torch.tensor([z], dtype=torch.float32)

    def describe(self, z: torch.Tensor) -> dict:
        """A code [1, D] as the page uses it: z, its slider coordinates, its place on the map."""
        return {"z": z[0].tolist(), "coords": self.basis.coords(z)[0].tolist(),
                "map": self.projection.transform(z.numpy())[0].tolist()}

    # --------------------------------------------------------------- endpoints
    def info(self) -> dict:
        run, b = self.run, self.basis
        return {
            "preset": run.config.preset, "step": run.step, "latent_dim": run.latent_dim,
            "conditional": run.conditional, "n_classes": run.model.n_classes,
            "sampler": run.default_sampler,
            "z_bound": Z_BOUND, "draw_size": [DRAW_MIN, DRAW_MAX], "max_steps": MAX_STEPS,
            "basis": {"kind": "axes" if run.latent_dim <= MAX_AXES else "principal",
                      "mean": b.mean.tolist(), "directions": b.directions.tolist(), "scale": b.scale.tolist()},
        }

    def latent_map(self) -> dict:
        proj = self.projection
        return {"method": proj.method, "points": np.round(proj.points, 4).tolist(),
                "labels": self.map_labels.tolist(), "mean": proj.mean.tolist(),
                "components": proj.components.tolist()}

    def decode(self, req: DecodeRequest) -> dict:
        z, y = self.code(req.z), self.label(req.digit)
        with self.lock:
            x = self.run.decode(z, y)
        return {"png": png_base64(x[0])}

    def random(self, req: RandomRequest) -> dict:
        y = self.label(req.digit)
        sampler = self.run.default_sampler
        with self.lock:
            z = self.run.codes(1, sampler=sampler, seed=req.seed, y=y)
            x = self.run.decode(z, y)
        return {**self.describe(z), "png": png_base64(x[0]), "sampler": sampler}

    def encode(self, req: EncodeRequest) -> dict:
        side = math.isqrt(len(req.pixels))
        if side * side != len(req.pixels):
            raise BadRequest(f"pixels must be a square image ({DRAW_MIN}..{DRAW_MAX} a side), got "
                             f"{len(req.pixels)} values")
        y = self.label(req.digit)
        x = latent.mnist_like(np.asarray(req.pixels, dtype=np.float32).reshape(side, side))
        with self.lock:
            mu, _ = self.run.encode(x[None], y)
            rec = self.run.decode(mu, y)
        return {**self.describe(mu), "input_png": png_base64(x), "png": png_base64(rec[0])}

    def interpolate(self, req: InterpolateRequest) -> dict:
        ends = [latent.first_index_of(self.test_labels, d) for d in (req.from_digit, req.to_digit)]
        x = self.test_images[ends].unsqueeze(1).float().div(255)
        with self.lock:
            path = latent.interpolate(self.run, x[0], x[1], req.steps, req.from_digit, req.to_digit)
        return {"linear": [png_base64(v) for v in path.linear],
                "spherical": [png_base64(v) for v in path.spherical],
                "labels": None if path.y is None else path.y.tolist()}


# ----------------------------------------------------------------------------- body size limit
class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, by Content-Length and by the bytes
    actually received (a chunked upload has no Content-Length), before the app parses anything."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                return await _reply(send, 400, "Content-Length is not a whole number")
            if n > self.limit:
                return await _reply(send, 413, f"request body too large ({n} bytes; the limit is {self.limit})")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _reply(send, 413, f"request body too large (over {self.limit} bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# ----------------------------------------------------------------------------- the app
def _short(errors: list[dict]) -> str:
    """pydantic's error list as one line: 'z.3: Input should be less than or equal to 50'."""
    parts = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def create_app(run, data_dir: str | Path | None = None, n_map: int = N_MAP):
    """The explorer app for a loaded run (see the module docstring and docs/WEB.md)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException

    ex = Explorer(run, data_dir, n_map)
    static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
    app = FastAPI(title="vaedraw explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _short(exc.errors())}, status_code=422)

    @app.exception_handler(VaedrawError)
    async def bad(request: Request, exc: VaedrawError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/")
    def index():
        return FileResponse(static["index.html"], media_type="text/html")

    @app.get("/static/{name}")
    def static_file(name: str):
        # Only the files shipped in web_static, looked up by exact name: no path is ever built from input.
        if name not in static:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(static[name])

    # The explorer's methods are the endpoints: FastAPI validates each body against the method's typed model.
    for method, path, endpoint in (("GET", "/api/info", ex.info), ("GET", "/api/map", ex.latent_map),
                                   ("POST", "/api/decode", ex.decode), ("POST", "/api/random", ex.random),
                                   ("POST", "/api/encode", ex.encode), ("POST", "/api/interpolate", ex.interpolate)):
        app.add_api_route(path, endpoint, methods=[method])

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    return app


def serve(run, host: str = "127.0.0.1", port: int = 8000, data_dir: str | Path | None = None) -> None:
    """Run the explorer with uvicorn until interrupted."""
    import uvicorn

    if not 0 < port < 65536:
        raise VaedrawError(f"--port must be in 1..65535, got {port}")
    app = create_app(run, data_dir)
    print(f"vaedraw: explorer for {run.run_dir} at http://{host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
