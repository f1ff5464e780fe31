"""A loopback HTTP server for download tests: serves named byte strings with HTTP Range
support, records every request, and can cut a transfer short once (an interrupted download)."""

from __future__ import annotations

import http.server
import os
import socket
import threading


class FixtureServer:
  """`with FixtureServer({"a.tar": data}) as s: s.url("a.tar")`."""

  def __init__(self, files: dict[str, bytes], cut_once: tuple[str, ...] = (), ranges=True):
    self.files, self.cut = dict(files), set(cut_once)
    self.ranges = ranges
    self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):  # quiet
        pass

      def do_GET(self):  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        owner.requests.append((name, rng))
        if name not in owner.files:
          self.send_error(404)
          return
        data = owner.files[name]
        start = 0
        if rng and owner.ranges:
          start = int(rng.removeprefix("bytes=").split("-")[0])
          if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
          self.send_response(206)
          self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
          self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in owner.cut:  # half the body, then the connection drops
          owner.cut.discard(name)
          self.wfile.write(body[: len(body) // 2])
          self.wfile.flush()
          self.connection.shutdown(socket.SHUT_RDWR)
          self.close_connection = True
          return
        self.wfile.write(body)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

  def url(self, name: str) -> str:
    return self.base + name

  def __enter__(self):
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()
    return False


def closed_port_url(name: str = "file") -> str:
  """An address on the loopback where nothing listens (connection refused at once)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/{name}"


def mvtec_tree(root, classes=("bottle",), size=64, n_train=6, n_good=2, n_bad=2, seed=0):
  """A tiny dataset in the MVTec layout under `root` (PNG images, masks for the defects)."""
  import numpy as np  # here only: the server above needs nothing but the standard library
  from PIL import Image

  rng = np.random.default_rng(seed)
  for c in classes:
    for sub, n in (("train/good", n_train), ("test/good", n_good), ("test/broken", n_bad)):
      d = os.path.join(root, c, sub)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        img = rng.integers(90, 110, size=(size, size, 3), dtype=np.uint8)
        if sub == "test/broken":
          img[10:20, 10:20] = 255
          m = np.zeros((size, size), np.uint8)
          m[10:20, 10:20] = 255
          md = os.path.join(root, c, "ground_truth", "broken")
          os.makedirs(md, exist_ok=True)
          Image.fromarray(m).save(os.path.join(md, f"{i:03d}_mask.png"))
        Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))
  return root


def tar_bytes(folder, arcname: str, mode: str = "w:gz") -> bytes:
  """`folder` packed as a tar archive (members under `arcname/`)."""
  import io
  import tarfile

  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode=mode) as tf:
    tf.add(folder, arcname=arcname)
  return buf.getvalue()
