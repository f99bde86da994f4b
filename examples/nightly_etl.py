"""A nightly extract-transform-load for one store, with rollback, as Python code.

``examples/nightly-etl.yaml`` is the same workflow written by hand; a test
keeps the two equal.  Render it with::

    tideflow render examples/nightly_etl.py > nightly-etl.yaml

and run it on this machine, no cloud needed::

    tideflow-agent run-local examples/nightly-etl.yaml --db site.db

Two extracts run in parallel and stage CSV files, ``transform`` joins them
into a report, ``load`` moves it into the warehouse folder, ``publish`` and
``cleanup`` finish up.  If anything fails for good, the compensation tasks
remove what was loaded and staged and say so.  Set the ``fail_load``
parameter to ``yes`` to watch that happen: ``load`` fails after writing into
the warehouse, is retried once, fails again, and ``rollback`` undoes it.
"""

from tideflow.builder import WORKFLOW_NAME, WORKFLOW_NAMESPACE, Backoff, Retry, Workflow

EXTRACT_SALES = """\
import csv, os, random
batch, rows = os.environ["BATCH"], int(os.environ["ROWS"])
rng = random.Random(batch)
with open(os.path.join(os.environ["BATCH_DIR"], "staging", "sales.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["sku", "qty", "price"])
    for _ in range(rows):
        sku, qty, price = rng.randrange(40), rng.randint(1, 5), rng.uniform(1, 50)
        out.writerow([f"sku-{sku:03d}", qty, f"{price:.2f}"])
with open(os.environ["TIDEFLOW_OUTPUTS"], "a") as outputs:
    outputs.write(f"rows={rows}\\n")
print(f"extracted {rows} sales rows for batch {batch}")
"""

EXTRACT_INVENTORY = """\
import csv, os, random
rng = random.Random("inventory-" + os.environ["BATCH"])
with open(os.path.join(os.environ["BATCH_DIR"], "staging", "stock.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["sku", "on_hand"])
    for sku in range(40):
        out.writerow([f"sku-{sku:03d}", rng.randint(0, 500)])
with open(os.environ["TIDEFLOW_OUTPUTS"], "a") as outputs:
    outputs.write("skus=40\\n")
print("extracted stock levels of 40 SKUs")
"""

TRANSFORM = """\
import csv, os
staging = os.path.join(os.environ["BATCH_DIR"], "staging")
revenue, sold = {}, 0
with open(os.path.join(staging, "sales.csv"), newline="") as f:
    for row in csv.DictReader(f):
        amount = int(row["qty"]) * float(row["price"])
        revenue[row["sku"]] = revenue.get(row["sku"], 0.0) + amount
        sold += 1
if sold != int(os.environ["EXPECTED_ROWS"]):
    raise SystemExit(f"read {sold} sales rows, extract reported {os.environ['EXPECTED_ROWS']}")
with open(os.path.join(staging, "stock.csv"), newline="") as f:
    stock = {row["sku"]: int(row["on_hand"]) for row in csv.DictReader(f)}
with open(os.path.join(staging, "report.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["sku", "revenue", "on_hand"])
    for sku in sorted(stock):
        out.writerow([sku, f"{revenue.get(sku, 0.0):.2f}", stock[sku]])
total = sum(revenue.values())
with open(os.environ["TIDEFLOW_OUTPUTS"], "a") as outputs:
    outputs.write(f"skus={len(stock)}\\nrevenue={total:.2f}\\n")
print(f"report: {len(stock)} SKUs, revenue {total:.2f}")
"""

PREPARE = """\
set -eu
rm -rf "$BATCH_DIR/staging"
mkdir -p "$BATCH_DIR/staging" "$WAREHOUSE"
echo "staging ready in $BATCH_DIR/staging"
"""

LOAD = """\
set -eu
# Copy then rename: the warehouse never holds a half-written report, and a
# retried (or re-run, after a crash) load just replaces it.
cp "$BATCH_DIR/staging/report.csv" "$WAREHOUSE/report-$BATCH.csv.partial"
mv "$WAREHOUSE/report-$BATCH.csv.partial" "$WAREHOUSE/report-$BATCH.csv"
echo "loaded report-$BATCH.csv into $WAREHOUSE"
if [ "$FAIL_LOAD" = yes ]; then
  echo "post-load check failed: warehouse constraint violated" >&2
  exit 3
fi
"""

CLEANUP = """\
rm -rf "$BATCH_DIR/staging"
echo "removed staging files of batch $BATCH"
"""

ROLLBACK = """\
set -eu
rm -f "$WAREHOUSE/report-$BATCH.csv" "$WAREHOUSE/report-$BATCH.csv.partial"
rm -rf "$BATCH_DIR/staging"
mkdir -p "$BATCH_DIR"
echo "rolled back batch $BATCH" | tee "$BATCH_DIR/ROLLED_BACK"
"""

workflow = Workflow(
    "nightly-etl",
    "retail",
    site="store-42",
    params={
        "batch": "2026-11-26",
        "sales_rows": "2000",
        "data_dir": "/tmp/tideflow-examples/nightly-etl",
        "fail_load": "no",
    },
    default_timeout_seconds=120,
    default_retry=Retry(limit=2, backoff=Backoff(seconds=0.5, factor=2, max_seconds=5)),
    deadline_seconds=1800,
)

# Scripts are never templated: they read parameters and outputs from env.
BATCH = workflow.param("batch")
BATCH_DIR = f"{workflow.param('data_dir')}/{BATCH}"
WAREHOUSE = f"{workflow.param('data_dir')}/warehouse"

prepare = workflow.task(
    "prepare", script=PREPARE, env={"BATCH_DIR": BATCH_DIR, "WAREHOUSE": WAREHOUSE}
)
extract_sales = workflow.task(
    "extract-sales",
    depends_on=[prepare],
    shell="python3",
    script=EXTRACT_SALES,
    env={"BATCH": BATCH, "BATCH_DIR": BATCH_DIR, "ROWS": workflow.param("sales_rows")},
)
extract_inventory = workflow.task(
    "extract-inventory",
    depends_on=[prepare],
    shell="python3",
    script=EXTRACT_INVENTORY,
    env={"BATCH": BATCH, "BATCH_DIR": BATCH_DIR},
)
transform = workflow.task(
    "transform",
    depends_on=[extract_sales, extract_inventory],
    shell="python3",
    script=TRANSFORM,
    env={"BATCH_DIR": BATCH_DIR, "EXPECTED_ROWS": extract_sales.output("rows")},
    timeout_seconds=60,
)
load = workflow.task(
    "load",
    depends_on=[transform],
    script=LOAD,
    env={
        "BATCH": BATCH,
        "BATCH_DIR": BATCH_DIR,
        "WAREHOUSE": WAREHOUSE,
        "FAIL_LOAD": workflow.param("fail_load"),
    },
    retry=Retry(limit=1, backoff=Backoff(seconds=0.2)),
)
publish = workflow.task(
    "publish",
    depends_on=[load],
    command=[
        "echo",
        f"published batch {BATCH}: {transform.output('skus')} SKUs, "
        f"revenue {transform.output('revenue')}",
    ],
)
workflow.task(
    "cleanup", depends_on=[publish], script=CLEANUP, env={"BATCH": BATCH, "BATCH_DIR": BATCH_DIR}
)

# Compensation: runs only if the DAG failed.
rollback = workflow.on_failure(
    "rollback",
    script=ROLLBACK,
    env={"BATCH": BATCH, "BATCH_DIR": BATCH_DIR, "WAREHOUSE": WAREHOUSE},
)
workflow.on_failure(
    "notify",
    depends_on=[rollback],
    command=["echo", f"{WORKFLOW_NAMESPACE}/{WORKFLOW_NAME}: batch {BATCH} failed, rolled back"],
)
