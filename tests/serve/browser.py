"""A real headless browser for tests: Debian's /usr/bin/chromium driven over the Chrome DevTools protocol.

No driver download and no browser download: scripts/setup.sh installs the ``chromium`` package, and this
talks CDP over a websocket (the ``websockets`` package's sync client).  Console messages, uncaught exceptions
and the browser's own log entries (failed loads, CSP violations) are collected as they arrive.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--remote-debugging-port=0", "--window-size=1280,1100", "--hide-scrollbars"]


class Browser:
    def __init__(self, binary: str = CHROMIUM, timeout_s: float = 60.0):
        from websockets.sync.client import connect

        self.dir = tempfile.mkdtemp(prefix="hr-chromium-")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.dir}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.dir) / "DevToolsActivePort"
        deadline = time.time() + timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"{binary} did not open its DevTools port (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout_s)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    # ----------------------------------------------------------------------------------------- protocol
    def send(self, method: str, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        mid = next(self._ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.time() + timeout_s
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} threw: {res['exceptionDetails']}")
        return res["result"].get("value")

    def navigate(self, url: str, timeout_s: float = 30.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href.startsWith({url!r}) && document.readyState === 'complete'", timeout_s,
                      f"{url} to load")

    def wait_for(self, expression: str, timeout_s: float, what: str = "") -> Any:
        """Poll a JS expression until it is truthy; returns its value.  (It may throw meanwhile: the page is
        still loading.)"""
        deadline = time.time() + timeout_s
        value: Any = None
        while time.time() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as e:
                value = e
            else:
                if value:
                    return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what or expression} (last: {value!r})")

    def screenshot(self, path: str | Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    # ------------------------------------------------------------------------------------------ console
    def problems(self) -> list[dict[str, Any]]:
        """Uncaught exceptions, console.error/warn/assert calls, and error-level browser log entries."""
        self.send("Runtime.evaluate", expression="0")  # flush events that arrived meanwhile
        out = []
        for ev in self.events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append({"kind": "exception", "text": json.dumps(p.get("exceptionDetails"))[:500]})
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append({"kind": f"console.{p['type']}",
                            "text": " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))})
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                e = p["entry"]
                out.append({"kind": f"log.{e.get('source')}.{e['level']}", "text": e.get("text", ""),
                            "url": e.get("url", "")})
        return out

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
