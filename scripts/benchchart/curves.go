package main

import "io"

// writeParallelSVG draws BenchmarkBoltPrepareCommitWithWork: Prepare+Commit
// operations per second against concurrent writers, per implementation,
// for 2 ms of sleep (solid) and a 4 KiB file fsynced (dashed) in the
// callback. Output without a writers dimension is drawn at 16 writers.
func writeParallelSVG(w io.Writer, r *results) error {
	impls := []struct{ name, label, color string }{
		{"containerd", "containerd's store", "#d9822b"},
		{ours, "snapmeta", "#2b6cb0"},
		{"snapmeta-parallel", "snapmeta, parallel callbacks", "#2f855a"},
	}
	var ss []series
	for _, work := range []struct {
		name, label string
		dashed      bool
	}{{"sleep2ms", "sleep 2 ms", false}, {"fsync", "fsync 4 KiB", true}} {
		for _, im := range impls {
			ss = append(ss, series{
				label:  im.label + ", " + work.label,
				color:  im.color,
				dashed: work.dashed,
				points: r.throughput("BenchmarkBoltPrepareCommitWithWork/work="+work.name+"/", im.name, 16),
			})
		}
	}
	return writeChart(w, chart{
		title:    "bbolt Prepare+Commit with work in the callback",
		subtitle: "callback sleeps 2 ms (solid) or writes and fsyncs 4 KiB (dashed); two fsynced transactions per operation",
		xlabel:   "concurrent writers (goroutines)",
		ylabel:   "Prepare+Commit per second",
		xBase:    2,
		yUnit:    "ops/s",
		series:   ss,
	})
}

// writeClientsSVG draws BenchmarkEtcdClients: Prepare+Commit per second
// against the number of clients, per implementation, on one member
// (solid) and, from r3 when given, on a 3-member cluster (dashed).
func writeClientsSVG(w io.Writer, r, r3 *results) error {
	impls := []struct{ name, label, color string }{
		{"raw", "raw etcd: read + Txn, twice", "#68d391"},
		{"raw2txn", "raw etcd: two guarded Txns", "#2f855a"},
		{"raw2txn-watched", "two Txns, a watch per client", "#d69e2e"},
		{ours, "snapmeta", "#2b6cb0"},
		{"snapmeta-cache", "snapmeta with cache", "#805ad5"},
	}
	var ss []series
	for _, im := range impls {
		ss = append(ss, series{label: im.label + ", 1 member", color: im.color, points: r.throughput("BenchmarkEtcdClients/", im.name, 0)})
	}
	if r3 != nil {
		for _, im := range impls {
			ss = append(ss, series{label: im.label + ", 3 members", color: im.color, dashed: true, points: r3.throughput("BenchmarkEtcdClients/", im.name, 0)})
		}
	}
	return writeChart(w, chart{
		title:    "etcd Prepare+Commit against the number of clients",
		subtitle: "each client its own connection and store; fsyncing members in the benchmark's process",
		xlabel:   "clients",
		ylabel:   "Prepare+Commit per second",
		xBase:    2,
		yUnit:    "ops/s",
		series:   ss,
	})
}
