"""Screenshots of the Dagster UI with a real headless Chromium: the asset lineage and an asset's page with its
latest materialization's metadata (figures). Also the helpers the webserver / UI tests use to run
``dagster-webserver`` / ``dagster-daemon`` as subprocesses and to talk GraphQL.

    .venv/bin/python scripts/ui_screenshots.py                          # over work/dagster_home (after `make demo`)
    .venv/bin/python scripts/ui_screenshots.py --dagster-home H --out DIR
    .venv/bin/python scripts/ui_screenshots.py --url http://127.0.0.1:3000   # a webserver already running

Needs Debian's Chromium (``apt-get install -y chromium``). Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = REPO_ROOT / ".venv" / "bin"
HOST = "127.0.0.1"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# pages: (file stem, path). /asset-groups is dagster 1.13's global asset lineage graph (its groups start
# collapsed: `expanded=` opens them, see lineage_path); an asset's page (/assets/<key>) shows its latest
# materialization with the metadata table (paths, sizes, figures); ?view=events lists every materialization.
PAGES = (
    ("lineage", None),
    ("typed_cells", "/assets/typed_cells"),
    ("segmented_slide", "/assets/segmented_slide"),
    ("typed_cells_events", "/assets/typed_cells?view=events"),
)


# -------------------------------------------------------------------------------------------------------------
# processes
# -------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> list[int]:
    """pids of live (not zombie) processes in process group ``pgid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def stop_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> list[int]:
    """SIGTERM the process group of ``proc`` (it was started in its own session), wait, SIGKILL what is left.
    Returns the pids that had to be killed."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    t_end = time.time() + timeout_s
    while time.time() < t_end:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return []
        time.sleep(0.3)
    left = _group_alive(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    return left


@dataclass
class DagsterServer:
    """``dagster-webserver`` (and optionally ``dagster-daemon run``) on 127.0.0.1, each in its own process group."""

    url: str
    home: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    killed: dict[str, list[int]] = field(default_factory=dict)

    def stop(self, timeout_s: float = 30.0) -> dict[str, list[int]]:
        for name, p in self.procs.items():
            self.killed[name] = stop_group(p, timeout_s)
        return self.killed

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(
            f"--- {k} ---\n{p.read_text(errors='replace')[-n:]}" for k, p in self.logs.items() if p.exists()
        )


def start_dagster(
    home: Path,
    env: dict | None = None,
    port: int | None = None,
    daemon: bool = True,
    workspace: Path = REPO_ROOT / "workspace.yaml",
    log_dir: Path | None = None,
) -> DagsterServer:
    """Start the webserver (and the daemon) over DAGSTER_HOME ``home``. Default signal handlers, own sessions:
    :meth:`DagsterServer.stop` ends them and everything they started."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # create the instance's storage (sqlite run / event / schedule DBs) once, here: webserver, daemon and their code
    # servers would otherwise race to create the schema of a fresh DAGSTER_HOME ("more than one head present")
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("__init__")
    port = port or free_port()
    log_dir = Path(log_dir or home)
    full_env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_DISABLE_TELEMETRY": "yes",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    cmds = {"webserver": [str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", HOST, "-p", str(port)]}
    if daemon:
        cmds["daemon"] = [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)]
    server = DagsterServer(url=f"http://{HOST}:{port}", home=home)
    for name, cmd in cmds.items():
        log = log_dir / f"{name}.log"
        server.logs[name] = log
        with open(log, "wb") as fh:
            server.procs[name] = subprocess.Popen(
                cmd,
                cwd=str(workspace.parent),
                env=full_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
    return server


# -------------------------------------------------------------------------------------------------------------
# GraphQL
# -------------------------------------------------------------------------------------------------------------
class GraphQLError(RuntimeError):
    pass


def graphql(url: str, query: str, variables: dict | None = None, timeout_s: float = 60.0) -> dict:
    """POST a query to ``<url>/graphql``; return ``data`` or raise :class:`GraphQLError` with the errors."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        doc = json.loads(r.read())
    if doc.get("errors"):
        raise GraphQLError(f"GraphQL errors: {json.dumps(doc['errors'])[:2000]}")
    return doc["data"]


WORKSPACE_Q = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on RepositoryLocation { name repositories { name } }
                        ... on PythonError { message } } } } } }"""


def wait_ready(server: DagsterServer, timeout_s: float = 180.0) -> dict:
    """Wait until the webserver answers and its code location has loaded; return the repository selector
    ``{repositoryLocationName, repositoryName}``. Raises with the logs when a process exits or time runs out."""
    t_end = time.time() + timeout_s
    last = ""
    while time.time() < t_end:
        for name, p in server.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}\n{server.log_tail()}")
        try:
            data = graphql(server.url, WORKSPACE_Q, timeout_s=10)
            for entry in data["workspaceOrError"].get("locationEntries", []):
                loc = entry.get("locationOrLoadError") or {}
                if loc.get("__typename") == "PythonError":
                    raise RuntimeError(f"code location {entry['name']} failed to load: {loc['message']}")
                if loc.get("__typename") == "RepositoryLocation" and loc["repositories"]:
                    return {"repositoryLocationName": loc["name"], "repositoryName": loc["repositories"][0]["name"]}
            last = json.dumps(data)[:300]
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = repr(e)
        time.sleep(1.0)
    raise TimeoutError(f"webserver {server.url} not ready after {timeout_s:g} s (last: {last})\n{server.log_tail()}")


# -------------------------------------------------------------------------------------------------------------
# Chromium
# -------------------------------------------------------------------------------------------------------------
def chromium_path() -> str | None:
    for c in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("headless Chromium not found (install it: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise TimeoutError(f"chromium did not finish within {timeout_s:g} s: {' '.join(cmd)}") from None
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def screenshot(
    url: str, png: Path, width: int = 1600, height: int = 1000, budget_ms: int = 15000, timeout_s: float = 120.0
) -> Path:
    """Render ``url`` in headless Chromium (JS run for ``budget_ms`` of virtual time) and save a PNG."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    r = _chromium(
        [f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url], timeout_s
    )
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(
            f"chromium wrote no screenshot of {url} (exit {r.returncode}): {r.stderr.decode(errors='replace')[-1500:]}"
        )
    return png


def dump_dom(url: str, width: int = 1600, height: int = 1000, budget_ms: int = 15000, timeout_s: float = 120.0) -> str:
    """The DOM of ``url`` after the page's scripts ran (``--dump-dom``)."""
    r = _chromium(
        [f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout_s
    )
    if r.returncode != 0 or not r.stdout:
        raise RuntimeError(
            f"chromium --dump-dom {url} failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-1500:]}"
        )
    return r.stdout.decode(errors="replace")


class _CDP:
    """A minimal Chrome DevTools Protocol session on one page of a headless Chromium (for pages that need a click;
    everything else uses the plain ``--screenshot`` / ``--dump-dom`` command line)."""

    def __init__(self, width: int, height: int, timeout_s: float):
        import re

        from websockets.sync.client import connect

        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("headless Chromium not found (install it: apt-get install -y chromium)")
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self.proc = subprocess.Popen(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile.name}",
                f"--window-size={width},{height}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        port, t_end = None, time.time() + timeout_s
        while port is None and time.time() < t_end:
            line = self.proc.stderr.readline().decode(errors="replace")
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
            elif not line and self.proc.poll() is not None:
                break
        if port is None:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port")
        with urllib.request.urlopen(f"http://{HOST}:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        self._id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=self.timeout_s))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, js: str):
        return self.call("Runtime.evaluate", expression=js, returnByValue=True).get("result", {}).get("value")

    def wait_for(self, js: str, what: str, timeout_s: float = 30.0):
        t_end = time.time() + timeout_s
        while time.time() < t_end:
            v = self.eval(js)
            if v:
                return v
            time.sleep(0.5)
        raise TimeoutError(f"page never showed {what} within {timeout_s:g} s")

    def close(self):
        try:
            if getattr(self, "_stack", None) is not None:
                self._stack.close()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self._profile.cleanup()


_OPEN_MARKDOWN_JS = """(() => {
  const row = [...document.querySelectorAll('tr')].find(r => r.firstElementChild &&
                r.firstElementChild.textContent.trim() === %s);
  const a = row && [...row.querySelectorAll('a')].find(a => a.textContent.includes('Show Markdown'));
  if (!a) return false; a.click(); return true; })()"""
_FIGURE_READY_JS = """(() => { const img = [...document.querySelectorAll('img')].find(i =>
  i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0);
  return img ? [img.naturalWidth, img.naturalHeight] : null; })()"""


def screenshot_metadata_figure(
    url: str, asset: str, key: str, png: Path, width: int = 1600, height: int = 1000, timeout_s: float = 90.0
) -> tuple[int, int]:
    """Open ``asset``'s page, click the ``[Show Markdown]`` of metadata entry ``key`` (a figure) and save the page
    with the figure's dialog as a PNG. Returns the figure's natural size (px)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    cdp = _CDP(width, height, timeout_s)
    try:
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=f"{url}/assets/{asset}")
        cdp.wait_for(_OPEN_MARKDOWN_JS % json.dumps(key), f"metadata entry '{key}' of {asset}", timeout_s)
        size = cdp.wait_for(_FIGURE_READY_JS, f"the figure of '{key}'", timeout_s)
        time.sleep(0.5)  # let the dialog's opening transition end
        import base64

        png.write_bytes(base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"]))
        return tuple(size)
    finally:
        cdp.close()


def lineage_path(url: str) -> str:
    """The global lineage page with every asset group expanded (the UI's group ids: ``global@global:<group>``)."""
    from urllib.parse import quote

    groups = sorted({n["groupName"] for n in graphql(url, "{ assetNodes { groupName } }")["assetNodes"]})
    return "/asset-groups?expanded=" + quote(",".join(f"global@global:{g}" for g in groups), safe="")


def prepare_ui(url: str) -> None:
    """Dismiss the UI's first-visit "join the community" dialog (it would cover every page) through GraphQL's
    ``setNuxSeen`` (stored in the instance)."""
    if graphql(url, "{ shouldShowNux }")["shouldShowNux"]:
        graphql(url, "mutation { setNuxSeen }")


FIGURES = (("typed_cells", "cell_types_figure"), ("segmented_slide", "qc_figure"))


def take_screenshots(url: str, out_dir: Path, pages=PAGES, figures=FIGURES) -> dict[str, Path]:
    """Save ``<out_dir>/<stem>.png`` for each page (path None: the expanded global lineage) and
    ``<asset>__<key>.png`` for each metadata figure (its dialog opened)."""
    prepare_ui(url)
    out_dir = Path(out_dir)
    out = {stem: screenshot(f"{url}{path or lineage_path(url)}", out_dir / f"{stem}.png") for stem, path in pages}
    for asset, key in figures:
        png = out_dir / f"{asset}__{key}.png"
        screenshot_metadata_figure(url, asset, key, png)
        out[f"{asset}__{key}"] = png
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dagster-home", default=str(REPO_ROOT / "work" / "dagster_home"))
    ap.add_argument("--config", default=None, help="SPATIAL_ASSETS_CONFIG for the webserver (default: the repo's)")
    ap.add_argument("--url", default=None, help="use this running webserver instead of starting one")
    ap.add_argument("--out", default=str(REPO_ROOT / "work" / "screenshots"))
    args = ap.parse_args(argv)
    if chromium_path() is None:
        print("headless Chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    server = None
    url = args.url
    if url is None:
        home = Path(args.dagster_home)
        if not (home / "dagster.yaml").exists():
            print(f"{home}: no Dagster instance (run `make demo` first, or pass --dagster-home)", file=sys.stderr)
            return 2
        env = {"SPATIAL_ASSETS_CONFIG": str(Path(args.config).resolve())} if args.config else {}
        server = start_dagster(home, env=env, daemon=False, log_dir=Path(tempfile.mkdtemp(prefix="dagster-ui-")))
        url = server.url
    try:
        if server is not None:
            wait_ready(server)
        for stem, png in take_screenshots(url, Path(args.out)).items():
            print(f"{stem}: {png}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
