"""A real Prometheus on loopback, scraping Envoys' /stats/prometheus with the shipped alert rules
loaded: what an operator's Prometheus sees of the filter.

    Prometheus(workdir, envoys).start()   Debian's prometheus, scraping every second
    Prometheus.started_by(proc, port, targets, log_path)   one the demo started
    .query(expr)                          the instant vector of a PromQL expression
    .rule_names()                         the alerting rules it loaded
    .stop()
"""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

from support.processes import ROOT, LogFile, die_with_parent, free_port, stop

RULES = ROOT / "envoy" / "observability" / "alerts.yaml"
BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus(LogFile):
    def __init__(self, workdir, envoys):
        self.workdir = workdir
        self.targets = [f"127.0.0.1:{envoy.admin_port}" for envoy in envoys]
        self.port = free_port()
        self.proc = None
        self.log_path = workdir / "prometheus.log"

    @classmethod
    def started_by(cls, proc, port, targets, log_path):
        """A Prometheus another process (``proc``) started on ``port``, scraping ``targets``:
        the demo's."""
        prometheus = cls.__new__(cls)
        prometheus.targets, prometheus.port, prometheus.log_path = targets, port, log_path
        prometheus.proc = None
        prometheus.wait_scraping(proc)
        return prometheus

    def start(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "envoy", "metrics_path": "/stats/prometheus",
                                "static_configs": [{"targets": self.targets}]}],
        }
        # JSON is YAML: Prometheus reads it as its configuration file.
        (self.workdir / "prometheus.yml").write_text(json.dumps(config))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [BINARY, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.wait_scraping(self.proc)
        return self

    def wait_scraping(self, proc):
        """Until every target has been scraped, while ``proc`` runs."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_tail(30)}")
            try:
                up = self.query("up")
                if len(up) == len(self.targets) and all(sample["value"][1] == "1" for sample in up):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus never scraped its targets:\n{self.log_tail(30)}")

    def api(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}", timeout=5) as resp:
            answer = json.loads(resp.read())
        if answer["status"] != "success":
            raise RuntimeError(f"{path}: {answer}")
        return answer["data"]

    def query(self, expr):
        return self.api("query?" + urllib.parse.urlencode({"query": expr}))["result"]

    def rule_names(self):
        return {rule["name"] for group in self.api("rules")["groups"] for rule in group["rules"]}

    def stop(self):
        proc, self.proc = self.proc, None
        stop(proc, grace=10)
