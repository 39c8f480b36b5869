#!/usr/bin/env bash
# Runs the benchmarks (bench_test.go) and writes docs/benchmarks.md and its
# charts (docs/write-throughput.svg, docs/parallel-callbacks.svg,
# docs/etcd-clients.svg, docs/scale.svg) from their output.
#
#   scripts/bench.sh                      # -count 5, default -benchtime
#   COUNT=1 BENCHTIME=200ms scripts/bench.sh
#   BENCH='Bolt' scripts/bench.sh         # a subset (a -bench regexp)
#   BENCH_INPUT=old.txt scripts/bench.sh  # re-render from saved output, no run
#   scripts/bench.sh -cpu 2               # extra arguments go to go test
#   SCALE=10000,100000,1000000 scripts/bench.sh   # BenchmarkScale again, into docs/scale.txt
#
# Environment: COUNT (5), BENCHTIME (go's default, 1s), BENCH (.),
# CLUSTER_BENCH (the etcd benchmarks run again on a 3-member cluster; empty
# skips that run), PKGS
# (./...), TIMEOUT (3h), BENCH_OUT (where the raw output bench.txt and the
# command that made it are kept; default a new temporary directory),
# BENCH_INPUT (a saved bench.txt to re-render instead of running; its
# command.txt beside it is used when there), BENCHSTAT_VERSION (pinned
# below). Run it on a quiet machine: every sub-benchmark is compared with
# its reference in the same process, but noise still widens the intervals.
# SCALE (unset: the scale section is rendered from docs/scale.txt, kept in
# the repository because a run to 1M snapshots takes most of an hour) runs
# BenchmarkScale at those sizes, its etcd server in a child process, and
# rewrites docs/scale.txt.
# A full run (-count 5) takes some 15 to 30 minutes on two cores (COUNT=3
# BENCHTIME=300ms took 4 minutes, building the 100k snapshots included).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-5}
BENCH=${BENCH:-.}
PKGS=${PKGS:-./...}
TIMEOUT=${TIMEOUT:-3h}
# golang.org/x/perf has no tagged releases; this is the pseudo-version of
# its latest commit when the script was written.
BENCHSTAT_VERSION=${BENCHSTAT_VERSION:-v0.0.0-20260908200009-22c9c6c9d4da}
BENCHSTAT="golang.org/x/perf/cmd/benchstat@${BENCHSTAT_VERSION}"

out_dir=${BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/snapmeta-bench.XXXXXX")}
mkdir -p "$out_dir" docs
raw=$out_dir/bench.txt

cmd=(go test -run '^$' -bench "$BENCH" -benchmem -count "$COUNT" -timeout "$TIMEOUT")
if [ -n "${BENCHTIME:-}" ]; then
	cmd+=(-benchtime "$BENCHTIME")
fi
cmd+=("$@" $PKGS)

# The command is kept beside the raw output, for re-rendering.
if [ -n "${BENCH_INPUT:-}" ]; then
	[ "$BENCH_INPUT" -ef "$raw" ] || cp "$BENCH_INPUT" "$raw"
	saved=$(dirname "$BENCH_INPUT")/command.txt
	if [ -f "$saved" ]; then
		command_line=$(cat "$saved")
		[ "$saved" -ef "$out_dir/command.txt" ] || cp "$saved" "$out_dir/command.txt"
	else
		command_line="(unknown: re-rendered from $BENCH_INPUT)"
	fi
else
	command_line=$(printf '%q ' "${cmd[@]}")
	command_line=${command_line% }
	echo "$command_line" >"$out_dir/command.txt"
	echo "+ $command_line" >&2
	"${cmd[@]}" 2>&1 | tee "$raw"
fi

# The etcd benchmarks again, against a 3-member cluster: every write is a
# quorum write. CLUSTER_BENCH='' skips it.
CLUSTER_BENCH=${CLUSTER_BENCH-'^BenchmarkEtcd(StatActive|GetSnapshot|CreateCommit|Remove|Clients)$'}
raw3=$out_dir/bench-cluster3.txt
if [ -n "${BENCH_INPUT:-}" ]; then
	saved3=$(dirname "$BENCH_INPUT")/bench-cluster3.txt
	if [ -f "$saved3" ] && ! [ "$saved3" -ef "$raw3" ]; then
		cp "$saved3" "$raw3"
	fi
elif [ -n "$CLUSTER_BENCH" ]; then
	cmd3=(go test -run '^$' -bench "$CLUSTER_BENCH" -benchmem -count "$COUNT" -timeout "$TIMEOUT")
	if [ -n "${BENCHTIME:-}" ]; then
		cmd3+=(-benchtime "$BENCHTIME")
	fi
	cmd3+=("$@" .)
	echo "+ SNAPMETA_BENCH_ETCD_MEMBERS=3 ${cmd3[*]}" >&2
	SNAPMETA_BENCH_ETCD_MEMBERS=3 "${cmd3[@]}" 2>&1 | tee "$raw3"
fi
chart=$out_dir/benchchart
go build -o "$chart" ./scripts/benchchart
ratios3="(not run: CLUSTER_BENCH was empty)"
cluster3=()
if [ -s "$raw3" ]; then
	ratios3=$("$chart" table -targets=false "$raw3")
	cluster3=(-cluster3 "$raw3")
fi

# BenchmarkScale: its saved output, or a new run with SCALE set.
scale_raw=docs/scale.txt
if [ -n "${SCALE:-}" ] && [ -z "${BENCH_INPUT:-}" ]; then
	scale_cmd=(go test -run '^$' -bench '^BenchmarkScale$' -benchtime 1x -benchmem -timeout "$TIMEOUT" .)
	scale_line="SNAPMETA_BENCH_ETCD_PROCESS=1 SNAPMETA_BENCH_SCALE=$SCALE $(printf '%q ' "${scale_cmd[@]}")"
	echo "+ $scale_line" >&2
	{
		echo "# ${scale_line% }"
		SNAPMETA_BENCH_ETCD_PROCESS=1 SNAPMETA_BENCH_SCALE=$SCALE "${scale_cmd[@]}" 2>&1
	} | tee "$out_dir/scale.txt"
	cp "$out_dir/scale.txt" "$scale_raw"
fi
scale_args=()
scale_section="(no docs/scale.txt: run with SCALE=10000,100000,1000000)"
if [ -s "$scale_raw" ]; then
	scale_args=(-scale "$scale_raw")
	"$chart" scale -o docs/scale.svg "$scale_raw"
	scale_section="$(head -1 "$scale_raw" | sed 's/^# *//; s/.*/Command: `&`/')

$("$chart" scale -table "$scale_raw")

![cost per snapshot against the store's size](scale.svg)"
fi

# benchstat: one table per engine, snapmeta next to its reference.
benchstat_out=$out_dir/benchstat.txt
if go run "$BENCHSTAT" -h >/dev/null 2>&1; then
	{
		echo "### bbolt engine vs containerd's store"
		echo
		echo '```'
		go run "$BENCHSTAT" -col /impl -filter '.name:/^Bolt/' "$raw"
		echo '```'
		echo
		echo "### etcd engine vs raw clientv3 calls"
		echo
		echo '```'
		go run "$BENCHSTAT" -col /impl -filter '.name:/^Etcd/' "$raw"
		echo '```'
	} >"$benchstat_out"
else
	echo "benchstat ($BENCHSTAT) is not reachable: leaving its tables out" >&2
	echo "benchstat ($BENCHSTAT) was not reachable when this was written." >"$benchstat_out"
fi

ratios=$("$chart" table "${cluster3[@]}" "${scale_args[@]}" "$raw")
"$chart" svg -o docs/write-throughput.svg "$raw"
# A partial run may lack a chart's benchmarks: say so in place of it.
parallel_chart="(not run: BenchmarkBoltPrepareCommitWithWork)"
if "$chart" parallel -o docs/parallel-callbacks.svg "$raw"; then
	parallel_chart="![Prepare+Commit with work in the callback against writers](parallel-callbacks.svg)"
fi
clients_chart="(not run: BenchmarkEtcdClients)"
if "$chart" clients -o docs/etcd-clients.svg "${cluster3[@]}" "$raw"; then
	clients_chart="![etcd Prepare+Commit against clients](etcd-clients.svg)"
fi

cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
{
	cat <<EOF
# Benchmarks

Generated by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'); do
not edit by hand, rerun the script (on a quiet machine: the figures below are
only as good as the machine was idle).

Each benchmark runs this package (\`impl=snapmeta\`) and a reference side by
side, as sub-benchmarks of one Benchmark in one process, so that their ratio
holds even where absolute times do not:

- **Bolt\***: the bbolt engine against containerd's own store
  (\`core/snapshots/storage\`, \`impl=containerd\`), both through their
  drop-in functions. Write benchmarks use the default options: every commit
  is fsynced, and the fsync is what they measure.
- **Etcd\***: the etcd engine against raw etcd (\`impl=raw\`): the fewest
  clientv3 calls doing the same work on the same embedded server and client
  (a read is one Get; a write one read and one guarded Txn; a walk the same
  paged range reads, without decoding). \`roundtrips/op\` counts requests.
  The server fsyncs, as every deployment does (etcd's default), and runs in
  the benchmark's process, so B/op and allocs/op include its share, the
  same on both sides. The tables below use one member; the etcd write
  benchmarks are run again against a 3-member cluster, where every write is
  a quorum write (its own table). The raw reference of a Prepare+Commit is
  two guarded \`Txn\`s: the physical limit is one quorum write each.
- Write benchmarks create on parents with at most 32 children each (every
  round makes its own), except **EtcdCreateActiveBusyParent**, whose parent
  has 10,000 or more.
- **WriteTx** (bbolt, N goroutines) and **Clients** (etcd, N clients with
  their own connection and store): ns/op is wall time per transaction, so
  tx/s is the throughput of all writers together.
- **EtcdWalk100k**: \`peak-heap-MiB\` is the peak HeapInuse during the walks
  above its value before them (after a GC); it includes the GC's slack,
  which grows with the process's live heap, the embedded server's included.
  \`peak-live-MiB\` is the peak live heap seen at each GC, above the same
  baseline: what the walk holds. \`base-live-MiB\` is the live heap before
  the walks; with GOGC=100 a peak-heap-MiB up to about that much is slack.

## Machine

| | |
| --- | --- |
| kernel | \`$(uname -a)\` |
| CPUs | $(nproc) × ${cpu:-unknown} |
| Go | \`$(go version)\` |
| command | \`$command_line\` |

## Snapmeta against the references

Medians over the runs; a ratio below 1 means snapmeta takes less time.
\`snapmeta-parallel\` is the bbolt store with \`WithParallelCallbacks\`,
\`snapmeta-cache\` the etcd store with its watch-fed cache; both are
compared with the same reference. The table ends with issue 16's targets.

$ratios

## etcd on a 3-member cluster

The same etcd benchmarks (\`SNAPMETA_BENCH_ETCD_MEMBERS=3\`): the three
members run in the benchmark's process, on one machine.

$ratios3

## Write throughput

![write throughput against concurrent writers](write-throughput.svg)

## Callbacks that do work (bbolt)

A driver's Prepare (create the active, then the callback's work) and
Commit, each a write transaction, from N goroutines at once.

$parallel_chart

## etcd clients

Prepare+Commit of a layer from N clients, each with its own connection and
store.

$clients_chart

## Scale

BenchmarkScale (bench_scale_test.go): per snapshot, the time of building
the store, of one GetSnapshot, of a whole-store Walk, Check, export and
migrate, at each size. Its output is kept in \`docs/scale.txt\`.

$scale_section

## benchstat

\`benchstat -col /impl\`, reference first: the "vs base" column is
snapmeta's change against it.

$(cat "$benchstat_out")
EOF
} >docs/benchmarks.md

echo "wrote docs/benchmarks.md and its charts; raw output in $raw" >&2
