"""Fleet view: one CronWorkflow fanned out to many sites — time until every site confirmed it.

Real kube-apiserver + etcd (``tideflow.tools.launchers.cluster``), real Mosquitto, one
real ``tideflow-operator run``; the sites are simulated (lightweight, as the
issue allows): one MQTT client answers for all of them as an agent would —
on a ``schedule`` put for site S it publishes, on S's ``events`` topic, a
batch with one ``schedule`` record (state Held), numbered in S's own
sequence — and notes when the operator acks it.  ``--sites`` EdgeSites
carry the label the CronWorkflow selects.

Measured from the moment ``kubectl apply`` of the CronWorkflow was started
(its own start-up, about a tenth of a second, is inside the figures):
when each site received its put, and when the operator acked each site's
confirmation (every site confirmed).  Baseline, same run, before the operator
starts: the benchmark itself publishes the same put to every site and waits
for every simulated confirmation — the broker's and the simulated sites' own
round trip, with no API server or operator in the path.

Run ``python -m bench.cron_fleet [--quick] [--sites N]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import REPO, print_table, python_info, ratio_line, scratch_dir
from tideflow import wire
from tideflow.tools.launchers.broker import Mosquitto
from tideflow.tools.launchers.cluster import EnvtestCluster, missing_reason


class SimulatedSites:
    """One MQTT client standing in for every site's agent."""

    def __init__(self, broker: Mosquitto) -> None:
        self.lock = threading.Lock()
        self.seq: dict[str, int] = {}
        self.put_at: dict[str, float] = {}
        self.acked_at: dict[str, float] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="simulated-sites")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: (
            c.subscribe(wire.subscription(wire.ASSIGN), 1),
            c.subscribe(wire.subscription(wire.ACKS), 1),
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def reset(self) -> None:
        with self.lock:
            self.put_at.clear()
            self.acked_at.clear()

    def online(self, sites: list[str]) -> None:
        for site in sites:
            state = wire.StatePayload(online=True, epoch="simulated")
            self.client.publish(
                wire.topic(site, wire.STATE), wire.encode(wire.KIND_STATE, site, state), 1,
                retain=True,
            )  # fmt: skip

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        site, channel = wire.parse_topic(message.topic)
        envelope = json.loads(message.payload)
        now = time.monotonic()
        if channel == wire.ACKS:
            with self.lock:
                if envelope["payload"].get("through", 0) >= self.seq.get(site, 1):
                    self.acked_at.setdefault(site, now)
            return
        if envelope.get("kind") != wire.KIND_SCHEDULE:
            return
        body = envelope["payload"]
        with self.lock:
            self.put_at.setdefault(site, now)
            seq = self.seq.get(site, 0) + 1
            self.seq[site] = seq
        record = {
            "uid": body["uid"], "generation": body["generation"],
            "namespace": body["namespace"], "name": body["name"],
            "state": "Held" if body["action"] == "put" else "Withdrawn", "missedCount": 0,
        }  # fmt: skip
        batch = wire.EventsPayload(
            records=[wire.EventRecord(seq=seq, kind="schedule", body=record)], epoch="simulated"
        )
        self.client.publish(
            wire.topic(site, wire.EVENTS), wire.encode(wire.KIND_EVENTS, site, batch), 1
        )

    def confirmed(self) -> int:
        with self.lock:
            return len(self.acked_at)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def cron_manifest(name: str, selector: dict[str, str]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "tideflow.io/v1alpha1",
            "kind": "CronWorkflow",
            "metadata": {"name": name, "namespace": "fleet"},
            "spec": {
                "schedule": "0 2 * * *",
                "placement": {"siteSelector": {"matchLabels": selector}},
                "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
            },
        }
    )


def run(n: int, tmp: Path) -> dict[str, Any]:
    sites = [f"fleet-{i:04d}" for i in range(n)]
    with EnvtestCluster() as cluster, Mosquitto(workdir=tmp / "broker") as broker:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/cronworkflows.tideflow.io")  # fmt: skip
        cluster.kubectl("create", "namespace", "fleet")
        docs = [
            {"apiVersion": "tideflow.io/v1alpha1", "kind": "EdgeSite",
             "metadata": {"name": s, "labels": {"fleet": "yes"}}, "spec": {}}
            for s in sites
        ]  # fmt: skip
        docs.append(
            {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "EdgeSite",
                "metadata": {"name": "warm", "labels": {"fleet": "warm"}},
                "spec": {},
            }
        )
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        sim = SimulatedSites(broker)
        try:
            sim.online([*sites, "warm"])
            # Baseline: the broker and the simulated sites alone.
            put = wire.SchedulePayload(action="put", uid="baseline", generation=1,
                                       namespace="fleet", name="baseline", spec={})  # fmt: skip
            t0 = time.monotonic()
            for site in sites:
                sim.client.publish(
                    wire.topic(site, wire.ASSIGN), wire.encode(wire.KIND_SCHEDULE, site, put), 1
                )
            wait(lambda: len(sim.put_at) >= n, 60, "baseline puts")
            base_put = max(sim.put_at[s] for s in sites) - t0
            sim.reset()
            sim.seq.clear()  # nobody applied the baseline's replies: each site starts at seq 1

            env = {k: v for k, v in cluster.env().items() if not k.startswith("TIDEFLOW_")}
            log = (tmp / "operator.log").open("ab")
            operator = subprocess.Popen(
                [sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", broker.url,
                 "--all-namespaces"],
                env=env, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
            try:
                # Warm-up: one site, through the whole path.
                cluster.kubectl("apply", "-f", "-", input=cron_manifest("warm", {"fleet": "warm"}))
                wait(lambda: "warm" in sim.acked_at, 120, "the warm-up confirmation")
                sim.reset()
                t0 = time.monotonic()  # kubectl's own start-up is inside the figures
                cluster.kubectl("apply", "-f", "-", input=cron_manifest("fleet", {"fleet": "yes"}))
                applied = time.monotonic() - t0
                try:
                    wait(lambda: sim.confirmed() >= n, 300, f"{n} confirmations")
                except SystemExit:
                    print(f"puts {len(sim.put_at)}, acks {len(sim.acked_at)}; operator log:")
                    print((tmp / "operator.log").read_text()[-3000:])
                    raise
                puts = sorted(sim.put_at[s] - t0 for s in sites)
                acks = sorted(sim.acked_at[s] - t0 for s in sites)
            finally:
                operator.terminate()
                try:
                    operator.wait(15)
                except subprocess.TimeoutExpired:
                    operator.kill()
                log.close()
        finally:
            sim.close()
    return {"puts": puts, "acks": acks, "baseline_put": base_put, "applied": applied}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 sites")
    parser.add_argument("--sites", type=int, default=None)
    args = parser.parse_args(argv)
    n = args.sites or (20 if args.quick else 200)
    reason = missing_reason()
    if reason:
        print(f"cron_fleet: skipped: {reason}")
        return 0
    print(f"# cron fleet: one CronWorkflow, {n} simulated sites; {python_info()}")
    with scratch_dir("cron-fleet") as tmp:
        out = run(n, tmp)
    rows = [
        ("every site received the put", f"{out['puts'][len(out['puts']) // 2]:.3f}",
         f"{out['puts'][-1]:.3f}"),
        ("every site's confirmation acked", f"{out['acks'][len(out['acks']) // 2]:.3f}",
         f"{out['acks'][-1]:.3f}"),
        ("(kubectl apply itself returned)", "", f"{out['applied']:.3f}"),
        ("baseline: bare publish to every site", "", f"{out['baseline_put']:.3f}"),
    ]  # fmt: skip
    print_table(("from kubectl apply", "median s", "all s"), rows)
    if out["baseline_put"] > 0:
        print(
            ratio_line("all confirmed / bare publish to all", out["acks"][-1] / out["baseline_put"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
