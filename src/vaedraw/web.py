"""The web explorer: a FastAPI app over one loaded run (`vaedraw serve RUN_DIR`).

    sock = open_socket("127.0.0.1", 8000)   # before the model loads: a busy port fails at once
    app = create_app(run, hosts=HostRule.for_bind("127.0.0.1", 8000))   # TestClient(app) in tests
    serve(run, sock=sock)                    # uvicorn on that socket until Ctrl-C

The page (web_static/: plain HTML, CSS and JS, no build step, nothing fetched from elsewhere) moves
through the latent space with sliders, draws from the run's sampler, interpolates between classes and
encodes a drawing made with the mouse. The JSON API it uses is documented in docs/WEB.md; every body is
validated strictly by a pydantic model (a boolean or a string is not a number) and every bad request
gets a 4xx with a message. The app sees the model only through the run's latent interface
(`run.encode`, `decode`, `codes`, `latent_dim`, `n_classes`, `image_shape`), so any architecture and
any image shape (grey or colour) is served the same way.

Sliders move coordinates c in a `latent.Basis`: the latent axes when D <= MAX_AXES, else the leading
principal directions of the test-set encoder means (z = mean + sum_i c_i std_i dir_i). The page
computes z from the basis it is sent; the server takes and returns full codes z [D].

A browser page on another site can reach a server on 127.0.0.1 by pointing its own host name at that
address (DNS rebinding); such requests carry the other site's name in their Host header, so every
request whose Host is not an address this server answers to is refused (`HostRule`).
"""

from __future__ import annotations

import base64
import errno
import io
import ipaddress
import json
import math
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from . import data, latent
from .errors import CheckpointError, ServeError, VaedrawError
from .sample import encode_means

STATIC_DIR = Path(__file__).resolve().parent / "web_static"
MAX_BODY = 64 * 1024  # bytes; the largest legitimate body (a 96x96 drawing) is about 40 KB
Z_BOUND = 50.0  # |z_i| above this is refused: codes of trained models stay within a few units
MAX_AXES = 16  # one slider per latent dimension up to this size, else principal directions
MAX_CODE = 4096  # longest code a request may carry; the run's own latent_dim is checked after parsing
MAX_LABEL = 100_000  # a class index beyond any data set's class count; the run's count is checked after
N_MAP = 2000  # test images placed on the latent map
DRAW_MIN, DRAW_MAX = 16, 96  # side of the square drawing the page sends (resampled to the model's size)
MAX_STEPS, DEFAULT_STEPS = 32, 10  # interpolation points
ALL_INTERFACES = ("", "0.0.0.0", "::", "*")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

Finite = Annotated[StrictFloat, Field(allow_inf_nan=False, ge=-Z_BOUND, le=Z_BOUND)]
Pixel = Annotated[StrictFloat, Field(allow_inf_nan=False, ge=0.0, le=1.0)]
Label = Annotated[StrictInt, Field(ge=0, le=MAX_LABEL)]


class _Body(BaseModel):
    # strict: JSON true is not 1, "3" is not 3, 2.5 is not a class index
    model_config = ConfigDict(extra="forbid", strict=True)


class DecodeRequest(_Body):
    z: list[Finite] = Field(max_length=MAX_CODE)
    digit: Label | None = None


class RandomRequest(_Body):
    digit: Label | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None


class EncodeRequest(_Body):
    pixels: list[Pixel] = Field(min_length=DRAW_MIN ** 2, max_length=DRAW_MAX ** 2)
    digit: Label | None = None


class InterpolateRequest(_Body):
    from_digit: Label
    to_digit: Label
    steps: Annotated[StrictInt, Field(ge=2, le=MAX_STEPS)] = DEFAULT_STEPS


class BadRequest(VaedrawError):
    """A well-formed body that does not fit this run (wrong code length, a label it cannot use)."""

    status = 400


class OutOfRange(BadRequest):
    """A value outside what this run accepts (a class it does not have): the same 422 as a value
    outside the schema's own bounds."""

    status = 422


def png_base64(x: torch.Tensor) -> str:
    """One image [C, H, W] in [0, 1] (C = 1 grey, 3 colour) -> base64 of a PNG of H x W pixels."""
    x = x.detach().float().cpu()
    if x.dim() == 2:
        x = x[None]
    a = torch.round(torch.nan_to_num(x, nan=0.0).clamp(0, 1) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(a[0], mode="L") if len(a) == 1 else Image.fromarray(a[:3].transpose(1, 2, 0), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _classes_in(labels: torch.Tensor) -> int:
    """How many classes the test labels name (0 for unlabelled data)."""
    return int(labels.max()) + 1 if len(labels) and int(labels.min()) >= 0 else 0


class Explorer:
    """What the app knows about its run: the slider basis, the latent map, the interpolation endpoints.

    Model calls are serialized by a lock: each is a millisecond, and concurrent calls would only
    compete for the same cores.
    """

    def __init__(self, run, data_dir: str | Path | None = None, n_map: int = N_MAP, test=None):
        self.run = run
        self.lock = threading.Lock()
        test = run.load_split("test", data_dir) if test is None else test
        self.test_images, self.test_labels = test.images, test.labels
        self.label_classes = _classes_in(test.labels)
        mu = encode_means(run.model, test.images[:n_map], test.labels[:n_map] if run.conditional else None)
        self._check_model(mu)
        self.projection = latent.Projection.fit(mu, "pca")
        self.map_labels = test.labels[:n_map]
        d = run.latent_dim
        self.basis = latent.Basis.axes(d) if d <= MAX_AXES else latent.Basis.principal(mu, MAX_AXES)

    def _check_model(self, mu: torch.Tensor) -> None:
        """Refuse to start on weights or a mixture that give non-finite codes or pictures: every
        request would fail, so say so once, at startup."""
        where = self.run.run_dir or "this run"
        if not torch.isfinite(mu).all():
            raise CheckpointError(f"{where}: the model's codes for the test images are not finite numbers: "
                                  "its weights are broken; resume from a good checkpoint or retrain")
        y = torch.zeros(1, dtype=torch.long) if self.run.conditional else None
        z = self.run.codes(1, seed=0, y=y)
        if not torch.isfinite(z).all():
            raise CheckpointError(f"{where}: the {self.run.default_sampler} sampler draws non-finite codes; "
                                  "refit it with `vaedraw fit-gmm`")
        if not torch.isfinite(self.run.decode(z, y)).all():
            raise CheckpointError(f"{where}: the decoder draws non-finite pixels: its weights are broken; "
                                  "resume from a good checkpoint or retrain")

    # --------------------------------------------------------------- checks
    def label(self, digit: int | None, field: str = "digit") -> torch.Tensor | None:
        if self.run.conditional:
            if digit is None:
                raise BadRequest(f"this model is conditional: give a {field} in 0..{self.run.n_classes - 1}")
            if digit >= self.run.n_classes:
                raise OutOfRange(f"{field}: must be in 0..{self.run.n_classes - 1}, got {digit}")
            return torch.tensor([digit])
        if digit is not None:
            raise BadRequest(f"this model is not conditional: leave {field} out")
        return None

    def data_class(self, value: int, field: str) -> int:
        if not self.label_classes:
            raise BadRequest("this run's test images have no classes to interpolate between")
        if value >= self.label_classes:
            raise OutOfRange(f"{field}: must be in 0..{self.label_classes - 1}, got {value}")
        return value

    def code(self, z: list[float]) -> torch.Tensor:
        if len(z) != self.run.latent_dim:
            raise BadRequest(f"z must have {self.run.latent_dim} numbers, got {len(z)}")
        return torch.tensor([z], dtype=torch.float32)

    def describe(self, z: torch.Tensor) -> dict:
        """A code [1, D] as the page uses it: z, its slider coordinates, its place on the map."""
        return {"z": z[0].tolist(), "coords": self.basis.coords(z)[0].tolist(),
                "map": self.projection.transform(z.numpy())[0].tolist()}

    def drawing(self, pixels: list[float]) -> torch.Tensor:
        """The page's square drawing -> one model input [C, H, W] laid out as the training digits were."""
        side = math.isqrt(len(pixels))
        if side * side != len(pixels):
            raise BadRequest(f"pixels must be a square image ({DRAW_MIN}..{DRAW_MAX} a side), got "
                             f"{len(pixels)} values")
        c, h, w = self.run.image_shape
        if c != 1:
            raise BadRequest(f"this run draws {c}-channel images; a drawing can only be encoded by a grey-image run")
        x = latent.mnist_like(np.asarray(pixels, dtype=np.float32).reshape(side, side))
        if tuple(x.shape[-2:]) != (h, w):
            x = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True,
                                                align_corners=False)[0].clamp(0, 1)
        return x

    # --------------------------------------------------------------- endpoints
    def info(self) -> dict:
        run, b = self.run, self.basis
        return {
            "preset": run.config.preset, "step": run.step, "latent_dim": run.latent_dim,
            "conditional": run.conditional, "n_classes": run.n_classes, "label_classes": self.label_classes,
            "image_shape": list(run.image_shape), "drawable": run.image_shape[0] == 1,
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
        x, y = self.drawing(req.pixels), self.label(req.digit)
        with self.lock:
            mu, _ = self.run.encode(x[None], y)
            rec = self.run.decode(mu, y)
        return {**self.describe(mu), "input_png": png_base64(x), "png": png_base64(rec[0])}

    def interpolate(self, req: InterpolateRequest) -> dict:
        a, b = self.data_class(req.from_digit, "from_digit"), self.data_class(req.to_digit, "to_digit")
        for value, field in ((a, "from_digit"), (b, "to_digit")):
            if self.run.conditional:  # each end is decoded with its own class: the model must have it
                self.label(value, field)
        ends = [latent.first_index_of(self.test_labels, d) for d in (a, b)]
        x = data.to_float(self.test_images[ends])
        with self.lock:
            path = latent.interpolate(self.run, x[0], x[1], req.steps, a, b)
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


# ----------------------------------------------------------------------------- Host header check
def _split_host(value: str) -> tuple[str, int | None] | None:
    """'name:port' / '[v6]:port' / 'name' -> (lower-case name, port or None); None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, found, rest = value.partition("]")
        if not found:
            return None
        name += "]"
    else:
        name, colon, rest = value.partition(":")
        rest = colon + rest
    if rest and not rest.startswith(":"):
        return None
    port = rest[1:] if rest else None
    name = name.rstrip(".")
    if port is None:
        return name, None
    if not port.isdigit() or len(port) > 5:
        return None
    return name, int(port)


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
    except ValueError:
        return False
    return True


def _url_host(host: str) -> str:
    """An address as it appears in a URL or Host header: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class HostRule:
    """Which Host headers this server answers: its own names at its own port.

    A rebinding page's requests name the attacker's domain, never one of these; IP literals
    cannot be rebound, so a server on every interface answers any of them (and `extra` names).
    """

    port: int
    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def for_bind(cls, host: str, port: int, extra: tuple[str, ...] = ()) -> "HostRule":
        host = host.strip().lower()
        names = {n.strip().lower().rstrip(".") for n in extra if n.strip()}
        if host in ALL_INTERFACES:
            names |= set(LOOPBACK_NAMES) | {socket.gethostname().lower()}
            return cls(port, frozenset(names), any_ip=True)
        names.add(_url_host(host))
        if _is_loopback(host):
            names |= set(LOOPBACK_NAMES)
        return cls(port, frozenset(names))

    def allows(self, header: str) -> bool:
        parsed = _split_host(header)
        if parsed is None:
            return False
        name, port = parsed
        if (port if port is not None else 80) != self.port:
            return False
        return name in self.names or (self.any_ip and _is_ip_literal(name))

    def describe(self) -> str:
        return ", ".join(f"{n}:{self.port}" for n in sorted(self.names)) + (" or any IP address" if self.any_ip else "")


class HostGuard:
    """ASGI middleware: refuse (403, JSON) a request whose Host header is not one `rule` allows."""

    def __init__(self, app, rule: HostRule):
        self.app, self.rule = app, rule

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        values = [v for k, v in scope.get("headers") or [] if k == b"host"]
        header = values[0].decode("latin-1") if len(values) == 1 else ""
        if not self.rule.allows(header):
            shown = data.sanitize(header, 100)
            return await _reply(send, 403, f"Host {shown!r} is not an address this explorer serves "
                                           f"(it answers {self.rule.describe()})")
        return await self.app(scope, receive, send)


# ----------------------------------------------------------------------------- the app
def _short(errors: list[dict]) -> str:
    """pydantic's error list as one line: 'z.3: Input should be less than or equal to 50'."""
    parts = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def create_app(run, data_dir: str | Path | None = None, n_map: int = N_MAP, hosts: HostRule | None = None,
               test=None):
    """The explorer app for a loaded run (see the module docstring and docs/WEB.md).

    `hosts`: the Host headers to answer (`serve` always passes its own); None answers any, for an app
    driven in-process or mounted behind a server that checks them. `test`: the split for the latent
    map and the interpolation endpoints (default: the run's test split)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException

    ex = Explorer(run, data_dir, n_map, test)
    static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
    app = FastAPI(title="vaedraw explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _short(exc.errors())}, status_code=422)

    @app.exception_handler(VaedrawError)
    async def bad(request: Request, exc: VaedrawError):
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status", 400))

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
    if hosts is not None:
        app.add_middleware(HostGuard, rule=hosts)  # added last: the outermost, before any body is read
    return app


# ----------------------------------------------------------------------------- binding and serving
def _is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (a loopback address, or a name resolving only to them);
    ServeError when it does not resolve."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host!r} is not an address this machine can serve on ({e})") from None
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_address(host: str, port: int, allow_remote: bool = False) -> str:
    """Validate --host/--port before anything is loaded; -> the address to bind ('' becomes 0.0.0.0).

    Serving beyond this machine (every interface, or a network address) must be asked for with
    allow_remote: the explorer has no login, and anyone who can reach the port can use it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise VaedrawError(f"--port must be in 1..65535, got {port}")
    host = host.strip()
    bind = "0.0.0.0" if host in ("", "*") else host
    if host in ALL_INTERFACES or not _is_loopback(host):
        where = "every network interface" if host in ALL_INTERFACES else f"the network address {host}"
        if not allow_remote:
            raise VaedrawError(f"--host {host or chr(34) * 2} would open the explorer to other machines on "
                               f"{where}; it has no login: add --allow-remote to do it anyway")
        print(f"vaedraw: warning: serving on {where}, port {port}: anyone who can reach it can use the "
              "explorer (there is no login)", file=sys.stderr)
    return bind


def open_socket(host: str, port: int, allow_remote: bool = False) -> socket.socket:
    """A listening-ready socket bound to host:port, or ServeError in one line (port in use, no such
    address, not allowed). Bound before the model loads, so a busy port is reported at once and no
    other program can take the port in between."""
    bind = check_address(host, port, allow_remote)
    try:
        infos = socket.getaddrinfo(bind.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host!r} is not an address this machine can serve on ({e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-stopped server's port is reusable
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host or '0.0.0.0'} is already in use (another explorer?); "
                             "stop it or pick another with --port") from None
        if e.errno == errno.EACCES:
            raise ServeError(f"no permission to serve on port {port}; ports below 1024 need privileges: "
                             "pick another with --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ServeError(f"--host {host} is not an address of this machine") from None
        raise ServeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(run, host: str = "127.0.0.1", port: int = 8000, data_dir: str | Path | None = None, *,
          allow_remote: bool = False, allow_hosts: tuple[str, ...] = (), sock: socket.socket | None = None,
          test=None) -> None:
    """Run the explorer with uvicorn until interrupted, on `sock` (from `open_socket(host, port)`)."""
    import uvicorn

    sock = sock or open_socket(host, port, allow_remote)
    try:
        app = create_app(run, data_dir, hosts=HostRule.for_bind(host, port, tuple(allow_hosts)), test=test)
        shown = "127.0.0.1" if host.strip() in ALL_INTERFACES else _url_host(host.strip())
        print(f"vaedraw: explorer for {run.run_dir} at http://{shown}:{port}/ (Ctrl-C to stop)")
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
