"""Fan-out/fan-in over 50 tasks, written as a loop: the case for workflows as code.

``split`` plans the work, 48 ``shard-NN`` tasks each sum their slice of
``range(shards * chunk)`` in parallel, and ``merge`` reads all 48 outputs
through templates and checks the total against the one ``split`` predicted.
``examples/fan-out-fan-in.yaml`` is this file rendered::

    tideflow render examples/fan_out_fan_in.py > examples/fan-out-fan-in.yaml
    tideflow-agent run-local examples/fan-out-fan-in.yaml --db "$PWD/site.db" --concurrency 4

(a test keeps the two equal).  ``--concurrency`` caps how many shards run at
once; the DAG itself allows all 48.
"""

from tideflow.builder import Backoff, Retry, TaskRef, Workflow

SHARDS = 48

SPLIT = """\
set -eu
total=$((SHARDS * CHUNK))
echo "planning $SHARDS shards of $CHUNK numbers"
echo "shards=$SHARDS" >> "$TIDEFLOW_OUTPUTS"
echo "expected=$((total * (total - 1) / 2))" >> "$TIDEFLOW_OUTPUTS"
"""

SHARD = """\
set -eu
start=$((SHARD * CHUNK))
sum=$(((2 * start + CHUNK - 1) * CHUNK / 2))
sleep 0.1  # stands in for real work
echo "shard $SHARD: numbers $start..$((start + CHUNK - 1)) sum to $sum"
echo "sum=$sum" >> "$TIDEFLOW_OUTPUTS"
"""

MERGE = """\
import os
sums = {k: int(v) for k, v in os.environ.items() if k.startswith("SUM_")}
total, expected = sum(sums.values()), int(os.environ["EXPECTED"])
print(f"merged {len(sums)} shards: total {total}, expected {expected}")
if len(sums) != int(os.environ["SHARDS"]) or total != expected:
    raise SystemExit("fan-in mismatch")
with open(os.environ["TIDEFLOW_OUTPUTS"], "a") as outputs:
    outputs.write(f"total={total}\\n")
"""

workflow = Workflow(
    "fan-out-fan-in",
    "analytics",
    site="dc-edge-1",
    params={"shards": str(SHARDS), "chunk": "1000"},
    default_timeout_seconds=30,
    default_retry=Retry(limit=1, backoff=Backoff(seconds=0.2)),
)
chunk = workflow.param("chunk")

split = workflow.task(
    "split", script=SPLIT, env={"SHARDS": workflow.param("shards"), "CHUNK": chunk}
)
shards: list[TaskRef] = [
    workflow.task(
        f"shard-{i:02d}", script=SHARD, env={"SHARD": str(i), "CHUNK": chunk}, depends_on=[split]
    )
    for i in range(SHARDS)
]
workflow.task(
    "merge",
    depends_on=shards,
    shell="python3",
    script=MERGE,
    env={
        "SHARDS": split.output("shards"),
        "EXPECTED": split.output("expected"),
        **{f"SUM_{i:02d}": shard.output("sum") for i, shard in enumerate(shards)},
    },
)
