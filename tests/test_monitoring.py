"""Monitoring (issue 8): the Prometheus exporter (scraped by a real Prometheus), the shipped Prometheus / Grafana
files, W&B offline and TensorBoard run folders, health flags, and the user errors of each backend."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from dsrun.errors import UserError
from dsrun.monitor.base import Monitor
from dsrun.monitor.health import Health, HealthChecked
from dsrun.monitor.prometheus import PrometheusMonitor
from tests.conftest import FAST, REPO, assert_user_error, dsrun, read_metrics

DEPLOY = REPO / "deploy" / "monitoring"
BASE = [arg for arg in FAST if not arg.startswith("monitor=")]  # each test picks its monitors
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
INSTALL = "Debian's prometheus package (apt-get install prometheus; ./setup.sh --dev installs it)"
METRIC = re.compile(r"\bdsrun_[a-z0-9_]+")
ROW = {"step": 4, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1000.0, "samples_per_s": 7.8125,
       "mfu": None, "tokens_seen": 2048, "peak_memory_gib": 1.5, "elapsed_s": 12.0, "trained_tokens_per_s": 400.0,
       "eval_loss": 2.75, "eval_ppl": 15.64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of one /metrics page."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    [found] = [v for lab, v in samples[name] if labels.items() <= lab.items()]
    return found


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails, whatever this machine has


@pytest.fixture
def fake_nvml(monkeypatch):
    """Two GPUs through a stand-in pynvml; the second reports no power draw, as some boards do not."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = type("NVMLError", (Exception,), {})
    nv.NVML_TEMPERATURE_GPU, nv.NVML_PCIE_UTIL_TX_BYTES, nv.NVML_PCIE_UTIL_RX_BYTES = 0, 0, 1
    nv.nvmlInit = nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=(87, 3)[h], memory=0)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(10, 20)[h] * 2**30, total=24 * 2**30)
    nv.nvmlDeviceGetTemperature = lambda h, sensor: (71, 90)[h]
    nv.nvmlDeviceGetPcieThroughput = lambda h, counter: (100, 200)[counter]

    def power(h):
        if h == 1:
            raise nv.NVMLError("Not Supported")
        return 312_000

    nv.nvmlDeviceGetPowerUsage = power
    monkeypatch.setitem(sys.modules, "pynvml", nv)


# --- the exporter, in process ---------------------------------------------------------------------------------

def test_exporter_serves_the_last_row_health_and_host_without_nvml_then_stops(no_nvml, capsys):
    mon = PrometheusMonitor("run-a", port=0)
    assert capsys.readouterr().err == f"dsrun: prometheus metrics on http://127.0.0.1:{mon.port}/metrics\n"
    mon.start({"max_steps": 8})
    saved = time.time() - 60
    mon.log({**ROW, "step": 3, "loss_spike": True, "last_checkpoint_time": saved})
    mon.log({**ROW, "loss_spike": False, "last_checkpoint_time": saved})
    s = scrape(mon.url)
    run = {"run": "run-a", "rank": "0"}
    assert s["dsrun_step"] == [(run, 4.0)]
    assert value(s, "dsrun_max_steps") == 8
    assert value(s, "dsrun_loss") == 2.5 and value(s, "dsrun_learning_rate") == 1e-3
    assert value(s, "dsrun_grad_norm") == 0.75 and value(s, "dsrun_tokens_per_second") == 1000
    assert value(s, "dsrun_samples_per_second") == 7.8125 and value(s, "dsrun_tokens_seen_total") == 2048
    assert value(s, "dsrun_peak_memory_bytes") == 1.5 * 2**30
    assert "dsrun_mfu_ratio" not in s, "mfu None (CPU): no series rather than a made-up 0"
    assert value(s, "dsrun_loss_spike") == 0 and value(s, "dsrun_loss_spike_events_total") == 1
    assert 60 <= value(s, "dsrun_checkpoint_age_seconds") < 70
    assert 0 < value(s, "dsrun_host_memory_used_bytes") < value(s, "dsrun_host_memory_total_bytes")
    interfaces = [ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text().splitlines()[2:]]
    assert {lab["interface"] for lab, _ in s["dsrun_host_network_receive_bytes_total"]} == set(interfaces) - {"lo"}
    assert not [name for name in s if name.startswith("dsrun_gpu_")], "no NVML: no GPU series"
    assert value(s, "dsrun_eval_loss") == 2.75 and value(s, "dsrun_trained_tokens_per_second") == 400
    mon.log({**{k: v for k, v in ROW.items() if not k.startswith("eval_")}, "step": 5})
    assert value(scrape(mon.url), "dsrun_eval_perplexity") == 15.64, "the last eval stays until the next one"
    mon.finish({})
    with pytest.raises(OSError):
        urllib.request.urlopen(mon.url, timeout=2)


def test_gpu_series_per_gpu_where_nvml_reports_them(fake_nvml):
    mon = PrometheusMonitor("run-g", port=0)
    try:
        s = scrape(mon.url)
    finally:
        mon.finish({})
    assert value(s, "dsrun_gpu_utilization_ratio", gpu="0") == 0.87
    assert value(s, "dsrun_gpu_utilization_ratio", gpu="1", run="run-g") == 0.03
    assert value(s, "dsrun_gpu_memory_used_bytes", gpu="1") == 20 * 2**30
    assert value(s, "dsrun_gpu_memory_total_bytes", gpu="0") == 24 * 2**30
    assert value(s, "dsrun_gpu_temperature_celsius", gpu="1") == 90
    assert s["dsrun_gpu_power_watts"] == [({"run": "run-g", "gpu": "0"}, 312.0)], "gpu 1 reports no power"
    assert value(s, "dsrun_gpu_pcie_transmit_bytes_per_second", gpu="0") == 100 * 1024
    assert value(s, "dsrun_gpu_pcie_receive_bytes_per_second", gpu="0") == 200 * 1024


def test_runs_in_one_process_have_private_registries(no_nvml):
    """A Hydra multirun starts several runs in one process: the global registry would raise Duplicated timeseries."""
    a, b = PrometheusMonitor("a", port=0), PrometheusMonitor("b", port=0)
    try:
        a.log({**ROW, "step": 1})
        b.log({**ROW, "step": 2})
        assert scrape(a.url)["dsrun_step"] == [({"run": "a", "rank": "0"}, 1.0)]
        assert scrape(b.url)["dsrun_step"] == [({"run": "b", "rank": "0"}, 2.0)]
    finally:
        a.finish({})
        b.finish({})
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("dsrun")]


# --- health flags ---------------------------------------------------------------------------------------------

def test_health_flags_nonfinite_and_spikes_but_not_a_falling_loss_or_an_early_jump():
    early = Health()
    early.check({"step": 1, "loss": 1.0})
    assert early.check({"step": 2, "loss": 5.0})[0] == {"loss_nonfinite": False, "loss_spike": False}

    health = Health()
    for step, loss in enumerate([10, 8, 6, 5, 4.5, 4.2, 4.0], 1):
        flags, warnings = health.check({"step": step, "loss": loss, "grad_norm": 1.0})
        assert not any(flags.values()) and not warnings
    flags, warnings = health.check({"step": 8, "loss": 20.0, "grad_norm": 1.0})
    assert flags["loss_spike"] and not flags["grad_norm_spike"] and not flags["loss_nonfinite"]
    assert warnings == ["step 8: loss spike, 20 is 2.6x its moving average 7.687"]
    flags, warnings = health.check({"step": 9, "loss": float("nan"), "grad_norm": float("inf")})
    assert flags["loss_nonfinite"] and flags["grad_norm_nonfinite"] and not flags["loss_spike"]
    assert [w.split(";")[0] for w in warnings] == ["step 9: loss is nan", "step 9: grad_norm is inf"]


def test_flags_reach_every_monitor_and_the_console_prints_a_warning():
    class Recorder(Monitor):
        def __init__(self):
            self.rows = []

        def log(self, metrics):
            self.rows.append(metrics)

    recorder, out = Recorder(), io.StringIO()
    checked = HealthChecked([recorder], Console(file=out, width=200))
    checked.log({"step": 1, "loss": 3.0, "grad_norm": 1.0})
    checked.log({"step": 2, "loss": float("nan"), "grad_norm": 1.0})
    assert recorder.rows[0]["loss_nonfinite"] is False and recorder.rows[1]["loss_nonfinite"] is True
    assert out.getvalue().splitlines() == ["dsrun: warning: step 2: loss is nan; the run is diverging (lower "
                                           "train.lr, check precision and data)"]


# --- the shipped Prometheus and Grafana files -----------------------------------------------------------------

def emitted_names() -> set[str]:
    """Every sample name the exporter serves with GPUs, an MFU and a checkpoint time present."""
    mon = PrometheusMonitor("names", port=0)
    mon.start({"max_steps": 2})
    mon.log({**ROW, "mfu": 0.4, "last_checkpoint_time": time.time()})
    try:
        return set(scrape(mon.url))
    finally:
        mon.finish({})


def test_dashboard_queries_only_emitted_metrics_and_shows_every_one(fake_nvml):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["targets"] for p in panels)
    used = {name for p in panels for t in p["targets"] for name in METRIC.findall(t["expr"])}
    emitted = emitted_names()
    assert used - emitted == set(), "dashboard queries a metric the exporter does not emit"
    assert emitted - used == set(), "an emitted metric has no panel"


def test_alert_rules_watch_only_emitted_metrics(fake_nvml):
    rules = [r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    used = {name for r in rules for name in METRIC.findall(r["expr"])}
    assert used and used - emitted_names() == set()


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH: {INSTALL}")
def test_promtool_accepts_the_shipped_config_and_rules():
    for check in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        proc = subprocess.run([PROMTOOL, *check], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH: {INSTALL}")
def test_alerts_fire_on_what_they_watch_and_not_before(tmp_path):
    firing = 'ALERTS{alertstate="firing"}'
    tests = {"rule_files": [str(DEPLOY / "alerts.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'dsrun_loss_nonfinite{run="r",rank="0"}', "values": "0 0 1 0x8"},
            {"series": 'dsrun_gpu_temperature_celsius{run="r",gpu="0"}', "values": "70 90x10"},
            {"series": 'dsrun_host_memory_used_bytes{run="r"}', "values": "50x3 99x5"},
            {"series": 'dsrun_host_memory_total_bytes{run="r"}', "values": "100x8"},
            {"series": 'dsrun_step{run="r",rank="0"}', "values": "1 2 3 4"},
            {"series": 'dsrun_max_steps{run="r",rank="0"}', "values": "100x3"},
        ],
        "promql_expr_test": [
            {"expr": f"count by (alertname) ({firing})", "eval_time": "1m", "exp_samples": []},
            {"expr": f"count by (alertname) ({firing})", "eval_time": "2m",
             "exp_samples": [{"labels": '{alertname="DsrunLossNonFinite"}', "value": 1}]},
            {"expr": f"count by (alertname) ({firing})", "eval_time": "7m", "exp_samples": [
                {"labels": '{alertname="DsrunGpuTemperatureHigh"}', "value": 1},
                {"labels": '{alertname="DsrunHostMemoryNearlyFull"}', "value": 1}]},
        ],
    }]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- real jobs ------------------------------------------------------------------------------------------------

def test_a_real_prometheus_scrapes_the_job_and_loads_the_alert_rules(tmp_path, run_dir):
    if PROMETHEUS is None:
        pytest.skip(f"prometheus not on PATH: {INSTALL}")
    exporter, web = free_port(), free_port()
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())  # the shipped file, pointed at this job
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    [job] = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [f"127.0.0.1:{exporter}"]}])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
                              stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{web}/api/v1"

    def query(expr: str) -> float:
        with urllib.request.urlopen(f"{api}/query?{urlencode({'query': expr})}", timeout=5) as reply:
            [result] = json.load(reply)["data"]["result"]
        return float(result["value"][1])

    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web}/-/ready", timeout=1)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready in 30 s:\n" + (tmp_path / "prometheus.log").read_text())
        # the exporter is up for the job plus linger_s: at a 1 s scrape interval that is several scrapes
        proc = dsrun(*BASE, "train.max_steps=4", "monitor=[console,prometheus]",
                     f"monitor.prometheus.port={exporter}", "monitor.prometheus.linger_s=6", run_dir=run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        final = read_metrics(run_dir)[-1]
        assert final["loss_nonfinite"] is False and final["loss_spike"] is False, "health flags reach metrics.jsonl"
        # the job has ended and its series are stale: ask for the last value each had
        this = '{job="dsrun", run="run", rank="0"}'
        assert query(f"last_over_time(dsrun_step{this}[5m])") == 4
        assert query(f"last_over_time(dsrun_loss{this}[5m])") == final["loss"]
        assert query(f"last_over_time(dsrun_tokens_seen_total{this}[5m])") == final["tokens_seen"]
        assert query(f"last_over_time(dsrun_learning_rate{this}[5m])") == final["lr"]
        assert query(f"count_over_time(dsrun_step{this}[5m])") >= 3, "scraped repeatedly during the job"
        assert query('last_over_time(dsrun_host_memory_total_bytes{run="run"}[5m])') > 0
        with urllib.request.urlopen(f"{api}/rules", timeout=5) as reply:
            loaded = [r for g in json.load(reply)["data"]["groups"] for r in g["rules"]]
        shipped = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for g in shipped for r in g["rules"])
        assert all(r["health"] == "ok" for r in loaded), loaded
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def wandb_records(path: Path):
    """The records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks of chunks) of protobuf
    records. wandb no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_and_tensorboard_record_every_step_and_never_the_api_key(run_dir):
    key = "0123456789abcdef0123456789abcdef01234567"  # the shape of a real key, so a leak would be found
    proc = dsrun(*BASE, "train.max_steps=4", "monitor=[console,wandb,tensorboard]", "monitor.wandb.group=sweep-a",
                 run_dir=run_dir, env={"WANDB_API_KEY": key})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    [wandb_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert f"wandb sync {wandb_file.parent}" in proc.stderr

    records = list(wandb_records(wandb_file))
    def items(updates) -> dict:  # wandb files a key under `key` or, as a path, under `nested_key`
        return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}

    history = {r.history.step.num: items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"}
    assert sorted(history) == [1, 2, 3, 4]
    for row in rows:
        assert history[row["step"]]["loss"] == row["loss"] and history[row["step"]]["lr"] == row["lr"]
        assert history[row["step"]]["loss_spike"] is False
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "sweep-a" and run.display_name == "run"
    config = items(run.config.update)
    assert config["train"]["max_steps"] == 4 and config["monitor"]["wandb"]["group"] == "sweep-a"
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["final_loss"] == rows[-1]["loss"] and summary["status"] == "completed"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in rows], rel=1e-6)

    leaks = [p for p in run_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaks and key not in proc.stdout + proc.stderr


# --- user errors ----------------------------------------------------------------------------------------------

def test_a_port_in_use_is_one_line_naming_it_and_the_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = dsrun(*BASE, "monitor=prometheus", f"monitor.prometheus.port={port}", run_dir=tmp_path / "run")
    assert_user_error(proc, f"monitor.prometheus.port={port}", f"127.0.0.1:{port}", "monitor.prometheus.port=0")
    # one error line; before it only dsrun's own three-line config summary (checked by assert_user_error)
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: error:")]) == 1


def test_wandb_that_cannot_be_imported_is_one_line(tmp_path):
    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("no wandb in this test")\n')
    proc = dsrun(*BASE, "monitor=wandb", run_dir=tmp_path / "run", env={"PYTHONPATH": str(broken.parent)})
    assert_user_error(proc, "monitor=wandb", "pip install wandb")
    # one error line; before it only dsrun's own three-line config summary (checked by assert_user_error)
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: error:")]) == 1


def test_wandb_online_without_a_login_is_a_user_error(tmp_path, monkeypatch):
    from dsrun.monitor.wandb import WandbMonitor

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = types.SimpleNamespace(mode="online", project="dsrun", entity=None, group=None)
    with pytest.raises(UserError, match="monitor.wandb.mode=online: .*WANDB_API_KEY.*monitor.wandb.mode=offline"):
        WandbMonitor(cfg, tmp_path / "run", {})


def test_sweep_trials_are_grouped_in_wandb_by_their_sweep(tmp_path):
    sweep = tmp_path / "my-sweep"
    proc = dsrun("-m", *BASE, "train.max_steps=2", "monitor=wandb", "train.micro_batch=1,2",
                 f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for trial in ("0", "1"):
        [wandb_file] = (sweep / trial).glob("wandb/offline-run-*/run-*.wandb")
        [run] = [r.run for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "run"]
        assert run.run_group == "my-sweep"
    assert "group: null" in (sweep / "0" / "config.yaml").read_text(), "the trial's config is the sweep's"
