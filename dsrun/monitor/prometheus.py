"""Prometheus `/metrics` on rank 0: the latest training metrics, health flags, GPU and host telemetry.

Each monitor has its own CollectorRegistry: the global one raises `Duplicated timeseries` when a second run
starts in the same process (a Hydra multirun). Values are read at scrape time from the last logged row and from
NVML / /proc, so telemetry stays live between log steps.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dsrun.errors import UserError
from dsrun.monitor.base import Monitor
from dsrun.monitor.health import FLAGS
from dsrun.monitor.nvml import GPU_READINGS, Gpus, host_memory, host_network

# metrics-row key -> (series name, description, factor to the unit in the name)
TRAINING = {
    "step": ("dsrun_step", "Optimizer steps completed", 1),
    "loss": ("dsrun_loss", "Training loss, mean over the last log interval", 1),
    "lr": ("dsrun_learning_rate", "Learning rate after the last step", 1),
    "grad_norm": ("dsrun_grad_norm", "Total gradient norm before clipping", 1),
    "tokens_per_s": ("dsrun_tokens_per_second", "Training throughput over the last log interval", 1),
    "samples_per_s": ("dsrun_samples_per_second", "Sequences per second over the last log interval", 1),
    "mfu": ("dsrun_mfu_ratio", "Model FLOPs utilisation (absent where the peak FLOP rate is unknown, e.g. CPU)", 1),
    "peak_memory_gib": ("dsrun_peak_memory_bytes", "Peak accelerator memory (CPU: peak RSS) of rank 0", 2**30),
    "elapsed_s": ("dsrun_elapsed_seconds", "Seconds since the first step started", 1),
    "trained_tokens_per_s": ("dsrun_trained_tokens_per_second", "Labelled (loss-bearing) tokens per second", 1),
    "eval_loss": ("dsrun_eval_loss", "Loss on the whole eval set at the last eval step", 1),
    "eval_ppl": ("dsrun_eval_perplexity", "exp(eval loss) at the last eval step", 1),
    # task=dpo
    "reward_margin": ("dsrun_dpo_reward_margin", "Chosen minus rejected implicit reward, mean of the interval", 1),
    "reward_accuracy": ("dsrun_dpo_reward_accuracy", "Share of pairs whose chosen reply is rewarded more", 1),
    # task=grpo (and each reward function's mean as dsrun_grpo_reward_by_function{function=...})
    "reward": ("dsrun_grpo_reward", "Mean summed reward of the interval's completions", 1),
    "completion_length": ("dsrun_grpo_completion_tokens", "Mean completion length in tokens", 1),
    "stopped": ("dsrun_grpo_stopped_ratio", "Share of completions that ended on an end-of-turn token", 1),
    "kl": ("dsrun_grpo_kl", "Mean per-token KL of the policy to the reference", 1),
    "rollout_tokens_per_s": ("dsrun_grpo_rollout_tokens_per_second", "Completion tokens sampled per second", 1),
}
EVAL = ("eval_loss", "eval_ppl")  # only eval steps carry them: the last values stay until the next eval


def gauge(name: str, doc: str, labels: dict[str, str], value: float) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class RunCollector:
    """Builds every series at scrape time from the latest metrics row (set by the monitor) and the hardware."""

    def __init__(self, run: str):
        self.labels = {"run": run, "rank": "0"}  # only rank 0 has monitors
        self.max_steps: int | None = None
        self.metrics: dict[str, Any] = {}
        self.counts = dict.fromkeys(FLAGS, 0)
        self.tokens_seen = 0
        self.gpus = Gpus()

    def collect(self) -> Iterator[Metric]:
        labels, metrics = self.labels, self.metrics  # one row: log() swaps the whole dict
        if self.max_steps is not None:
            yield gauge("dsrun_max_steps", "Optimizer steps this run is set to take", labels, self.max_steps)
        for key, (name, doc, factor) in TRAINING.items():
            if metrics.get(key) is not None:
                yield gauge(name, doc, labels, metrics[key] * factor)
        by_function = GaugeMetricFamily("dsrun_grpo_reward_by_function", "Mean reward of one reward function",
                                        labels=[*labels, "function"])
        for key, value in metrics.items():  # task=grpo: reward_<function name>
            if key.startswith("reward_") and key not in TRAINING and isinstance(value, (int, float)):
                by_function.add_metric([*labels.values(), key[len("reward_"):]], value)
        if by_function.samples:
            yield by_function
        tokens = CounterMetricFamily("dsrun_tokens_seen", "Tokens trained on (all ranks)", labels=list(labels))
        tokens.add_metric(list(labels.values()), self.tokens_seen)
        yield tokens
        for flag in FLAGS:
            yield gauge(f"dsrun_{flag}", f"1 when the last logged row raised {flag}", labels,
                        float(bool(metrics.get(flag))))
            events = CounterMetricFamily(f"dsrun_{flag}_events", f"Logged rows that raised {flag}",
                                         labels=list(labels))
            events.add_metric(list(labels.values()), self.counts[flag])
            yield events
        if metrics.get("last_checkpoint_time") is not None:
            yield gauge("dsrun_checkpoint_age_seconds", "Seconds since the last checkpoint was written", labels,
                        time.time() - metrics["last_checkpoint_time"])
        yield from self.hardware()

    def hardware(self) -> Iterator[Metric]:
        run = self.labels["run"]
        gpus = self.gpus.read()
        for reading, (doc, _) in GPU_READINGS.items():
            family = GaugeMetricFamily(f"dsrun_gpu_{reading}", doc, labels=["run", "gpu"])
            for index, gpu in enumerate(gpus):
                if reading in gpu:
                    family.add_metric([run, str(index)], gpu[reading])
            if family.samples:  # no NVML, or no GPU reports it: no series at all rather than an empty family
                yield family
        for reading, value in host_memory().items():
            yield gauge(f"dsrun_host_memory_{reading}", f"Host RAM, {reading.split('_')[0]}", {"run": run}, value)
        network = host_network()
        if network:
            for index, direction in enumerate(("receive", "transmit")):
                counter = CounterMetricFamily(f"dsrun_host_network_{direction}_bytes",
                                              f"Bytes {direction}d by the host since boot; rate() gives bytes/s",
                                              labels=["run", "interface"])
                for interface, counts in network.items():
                    counter.add_metric([run, interface], counts[index])
                yield counter


class PrometheusMonitor(Monitor):
    """Serves /metrics from construction (so a taken port fails before training) until finish()."""

    def __init__(self, run: str, host: str = "127.0.0.1", port: int = 9400, linger_s: float = 0.0):
        self.linger_s = linger_s
        self.collector = RunCollector(run)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            import errno
            import socket

            why = exc.strerror or str(exc)
            if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise UserError(f"monitor.prometheus.host={host}: cannot serve on it ({why}); use an address of this "
                                "machine, e.g. monitor.prometheus.host=127.0.0.1 (0.0.0.0 for every interface)") \
                    from None
            raise UserError(f"monitor.prometheus.port={port}: cannot serve on {host}:{port} ({why}); "
                            "stop what holds it, pick another port, or set monitor.prometheus.port=0 for a free one") \
                from None
        self.port = self.server.server_port
        self.url = f"http://{host}:{self.port}/metrics"
        print(f"dsrun: prometheus metrics on {self.url}", file=sys.stderr, flush=True)

    def start(self, info: dict[str, Any]) -> None:
        self.collector.max_steps = info["max_steps"]

    def log(self, metrics: dict[str, Any]) -> None:
        for flag in FLAGS:
            self.collector.counts[flag] += bool(metrics.get(flag))
        self.collector.tokens_seen = metrics.get("tokens_seen", self.collector.tokens_seen)
        last_eval = {k: self.collector.metrics[k] for k in EVAL if k in self.collector.metrics}
        self.collector.metrics = {**last_eval, **metrics}

    def finish(self, summary: dict[str, Any]) -> None:
        time.sleep(self.linger_s)  # a short job can end between two scrapes; linger lets the last values be seen
        self.server.shutdown()
        self.server.server_close()
        self.collector.gpus.close()
