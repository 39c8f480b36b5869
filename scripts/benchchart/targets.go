package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
)

// A target is one figure of the issue, checked against the medians.
type target struct {
	what  string
	goal  string
	value func() (float64, string) // the figure and how to show it
	met   func(v float64) bool
}

// The figures a target compares: time and throughput ratios of an
// implementation against its group's reference.
func (r *results) timeRatio(group, impl string) float64 {
	return r.getImpl(group, impl, "ns/op") / r.getImpl(group, reference(group), "ns/op")
}

// firstGroup is the first of groups the results hold, or the last one.
func (r *results) firstGroup(groups ...string) string {
	for _, g := range groups {
		if len(r.names[g]) > 0 {
			return g
		}
	}
	return groups[len(groups)-1]
}

// groupsWith lists the groups with prefix that hold both impl and their
// reference, in the order they ran.
func (r *results) groupsWith(prefix, impl string) []string {
	var out []string
	for _, name := range r.order {
		g, _ := splitImpl(name)
		if strings.HasPrefix(g, prefix) && !slices.Contains(out, g) &&
			r.name(g, impl) != "" && r.name(g, reference(g)) != "" {
			out = append(out, g)
		}
	}
	return out
}

// worst is the largest of f over groups, and the group it is at.
func worst(groups []string, f func(g string) float64) (float64, string) {
	v, at := math.NaN(), ""
	for _, g := range groups {
		x := f(g)
		if !math.IsNaN(x) && (math.IsNaN(v) || x > v) {
			v, at = x, strings.TrimPrefix(g, "Benchmark")
		}
	}
	return v, at
}

// throughputTarget: impl's throughput at least goal times the reference's
// in group. Where the group holds bbolt's ceilings (impl=bbolt-ideal, and
// impl=bbolt-ideal-two-steps for the writes a store makes), they are shown
// beside it: the most any store could reach.
func throughputTarget(r *results, what, group, impl string, goal float64) target {
	return target{
		what: what, goal: fmt.Sprintf("≥ %gx throughput", goal),
		value: func() (float64, string) {
			v := 1 / r.timeRatio(group, impl)
			text := fmt.Sprintf("%s throughput (%s → %s tx/s)", fmtRatio(v),
				fmtNum(1e9/r.getImpl(group, reference(group), "ns/op")), fmtNum(1e9/r.getImpl(group, impl, "ns/op")))
			if c := 1 / r.timeRatio(group, "bbolt-ideal"); !math.IsNaN(c) {
				text += fmt.Sprintf("; bbolt's ceiling (bbolt-ideal) is %s, snapmeta %s of it", fmtRatio(c), fmtRatio(v/c))
			}
			if c := 1 / r.timeRatio(group, "bbolt-ideal-two-steps"); !math.IsNaN(c) {
				text += fmt.Sprintf("; for the writes of a create then a commit (bbolt-ideal-two-steps) %s, snapmeta %s of it", fmtRatio(c), fmtRatio(v/c))
			}
			return v, text
		},
		met: func(v float64) bool { return v >= goal },
	}
}

// issue16Targets are issue 16's targets; r3 (a 3-member cluster's run)
// and rs (BenchmarkScale's) may be nil.
func issue16Targets(r, r3, rs *results) []target {
	work := r.firstGroup("BenchmarkBoltPrepareCommitWithWork/work=sleep2ms/writers=16", "BenchmarkBoltPrepareCommitWithWork/work=sleep2ms")
	ts := []target{
		throughputTarget(r, "bbolt Prepare+Commit, 2 ms of work in the callback, 16 writers: snapmeta-parallel vs containerd", work, "snapmeta-parallel", 8),
		throughputTarget(r, "bbolt create+commit, 16 writers, vs containerd", "BenchmarkBoltWriteTx/writers=16", ours, 8),
		throughputTarget(r, "bbolt create+commit, 64 writers, vs containerd", "BenchmarkBoltWriteTx/writers=64", ours, 10),
		{
			what: "bbolt create+commit, 1 writer, vs containerd", goal: "≤ 1.0x time",
			value: func() (float64, string) {
				v := r.timeRatio("BenchmarkBoltWriteTx/writers=1", ours)
				return v, fmtRatio(v) + " time"
			},
			met: func(v float64) bool { return v <= 1 },
		},
		{
			what: "every bbolt benchmark (snapmeta) vs containerd", goal: "≤ 1.0x time",
			value: func() (float64, string) {
				var gs []string
				for _, g := range r.groupsWith("BenchmarkBolt", ours) {
					if !strings.HasSuffix(g, "/file") { // no time: a file's size
						gs = append(gs, g)
					}
				}
				v, at := worst(gs, func(g string) float64 { return r.timeRatio(g, ours) })
				text := fmt.Sprintf("worst: %s, %s time", at, fmtRatio(v))
				// An open that reads every page has a floor: reading the file.
				if f := r.timeRatio("Benchmark"+at, "read-file"); !math.IsNaN(f) {
					text += fmt.Sprintf("; reading the file alone takes %s, snapmeta %s of that", fmtRatio(f), fmtRatio(v/f))
				}
				return v, text
			},
			met: func(v float64) bool { return v <= 1 },
		},
		{
			what: "bbolt creates, allocs/op vs containerd", goal: "≤ 1.0x",
			value: func() (float64, string) {
				v, at := worst(r.groupsWith("BenchmarkBoltCreate", ours), func(g string) float64 {
					return r.getImpl(g, ours, "allocs/op") / r.getImpl(g, reference(g), "allocs/op")
				})
				g := "Benchmark" + at
				return v, fmt.Sprintf("worst: %s, %s → %s (%s)", at,
					fmtNum(r.getImpl(g, reference(g), "allocs/op")), fmtNum(r.getImpl(g, ours, "allocs/op")), fmtRatio(v))
			},
			met: func(v float64) bool { return v <= 1 },
		},
		{
			what: "bbolt chain of depth 10,000: file size vs containerd", goal: "≤ 1.5x",
			value: func() (float64, string) {
				g := "BenchmarkBoltDeepChain/file"
				rf, of := r.getImpl(g, "containerd", "file-MiB"), r.getImpl(g, ours, "file-MiB")
				return of / rf, fmt.Sprintf("%s (%s → %s MiB; used %s → %s MiB)", fmtRatio(of/rf), fmtNum(rf), fmtNum(of),
					fmtNum(r.getImpl(g, "containerd", "used-MiB")), fmtNum(r.getImpl(g, ours, "used-MiB")))
			},
			met: func(v float64) bool { return v <= 1.5 },
		},
		{
			what: "bbolt chain of depth 10,000: Check", goal: "< 1 s",
			value: func() (float64, string) {
				v := r.getImpl("BenchmarkBoltDeepChain/Check", ours, "ns/op")
				return v, fmtTime(v)
			},
			met: func(v float64) bool { return v < 1e9 },
		},
		{
			what: "bbolt chain of depth 10,000: GetSnapshot vs containerd", goal: "one lookup: ≤ 1.0x time",
			value: func() (float64, string) {
				g := "BenchmarkBoltDeepChain/GetSnapshot"
				v := r.timeRatio(g, ours)
				return v, fmt.Sprintf("%s time (%s → %s)", fmtRatio(v), fmtTime(r.getImpl(g, "containerd", "ns/op")), fmtTime(r.getImpl(g, ours, "ns/op")))
			},
			met: func(v float64) bool { return v <= 1 },
		},
		{
			what: "etcd round trips per Prepare+Commit (1 client) vs raw", goal: "≤ raw's",
			value: func() (float64, string) {
				g := "BenchmarkEtcdClients/clients=1"
				raw, our := r.getImpl(g, "raw", "roundtrips/op"), r.getImpl(g, ours, "roundtrips/op")
				text := fmt.Sprintf("%s → %s", fmtNum(raw), fmtNum(our))
				if c := r.getImpl(g, "snapmeta-cache", "roundtrips/op"); !math.IsNaN(c) {
					text += fmt.Sprintf(" (snapmeta-cache %s)", fmtNum(c))
				}
				return our / raw, text
			},
			met: func(v float64) bool { return v <= 1.005 },
		},
		clientsTarget(r, "etcd Prepare+Commit, 32 clients: snapmeta-cache vs raw"),
		{
			what: "etcd read-only GetInfo/GetSnapshot (snapmeta, no cache) vs raw", goal: "≤ 1.1x time",
			value: func() (float64, string) {
				gs := append(r.groupsWith("BenchmarkEtcdStat", ours), r.groupsWith("BenchmarkEtcdGetSnapshot", ours)...)
				v, at := worst(gs, func(g string) float64 { return r.timeRatio(g, ours) })
				text := fmt.Sprintf("worst: %s, %s time", at, fmtRatio(v))
				cs := append(r.groupsWith("BenchmarkEtcdStat", "snapmeta-cache"), r.groupsWith("BenchmarkEtcdGetSnapshot", "snapmeta-cache")...)
				if c, cat := worst(cs, func(g string) float64 { return r.timeRatio(g, "snapmeta-cache") }); !math.IsNaN(c) {
					text += fmt.Sprintf(" (snapmeta-cache worst: %s, %s)", cat, fmtRatio(c))
				}
				return v, text
			},
			met: func(v float64) bool { return v <= 1.1 },
		},
		{
			// The issue measures the client process alone: in process,
			// the embedded server's live heap sets the GC's slack.
			what: "etcd walk of 100k snapshots, server in another process: the client's peak heap", goal: "< 64 MiB",
			value: func() (float64, string) {
				const apart, inProcess = "BenchmarkEtcdWalk100kServerApart", "BenchmarkEtcdWalk100k"
				v := r.getImpl(apart, ours, "peak-heap-MiB")
				text := fmt.Sprintf("%s MiB HeapInuse, %s MiB live (raw: %s, %s); with the server in process %s MiB HeapInuse, %s MiB live, above %s MiB live before the walk (mostly the server's)",
					fmtNum(v), fmtNum(r.getImpl(apart, ours, "peak-live-MiB")),
					fmtNum(r.getImpl(apart, "raw", "peak-heap-MiB")), fmtNum(r.getImpl(apart, "raw", "peak-live-MiB")),
					fmtNum(r.getImpl(inProcess, ours, "peak-heap-MiB")), fmtNum(r.getImpl(inProcess, ours, "peak-live-MiB")),
					fmtNum(r.getImpl(inProcess, ours, "base-live-MiB")))
				return v, text
			},
			met: func(v float64) bool { return v < 64 },
		},
		{
			what: "etcd walk of 100k snapshots with the watch cache, server in another process: the client's live heap", goal: "< 64 MiB",
			value: func() (float64, string) {
				const g = "BenchmarkEtcdWalk100kServerApart"
				held, walk := r.getImpl(g, "snapmeta-cache", "cache-MiB"), r.getImpl(g, "snapmeta-cache", "peak-live-MiB")
				return held + walk, fmt.Sprintf("%s MiB: the copy %s MiB (%s B/snapshot) + the walk %s MiB live (HeapInuse peak %s MiB above the copy, GC slack included); walk %s vs raw paged %s",
					fmtNum(held+walk), fmtNum(held), fmtNum(r.getImpl(g, "snapmeta-cache", "cache-B/snapshot")), fmtNum(walk),
					fmtNum(r.getImpl(g, "snapmeta-cache", "peak-heap-MiB")),
					fmtTime(r.getImpl(g, "snapmeta-cache", "ns/op")), fmtTime(r.getImpl(g, "raw", "ns/op")))
			},
			met: func(v float64) bool { return v < 64 },
		},
	}
	if r3 == nil {
		r3 = &results{}
	}
	ts = append(ts, clientsTarget(r3, "3 members: etcd Prepare+Commit, 32 clients: snapmeta-cache vs raw"))
	ts = append(ts, target{
		what: "3 members: etcd round trips per Prepare+Commit (1 client) vs raw", goal: "≤ raw's",
		value: func() (float64, string) {
			g := "BenchmarkEtcdClients/clients=1"
			raw, our := r3.getImpl(g, "raw", "roundtrips/op"), r3.getImpl(g, ours, "roundtrips/op")
			return our / raw, fmt.Sprintf("%s → %s", fmtNum(raw), fmtNum(our))
		},
		met: func(v float64) bool { return v <= 1.005 },
	})
	return append(ts, scaleTargets(rs)...)
}

// clientsTarget: at 32 clients, snapmeta-cache's throughput ≥ 90% of the
// physical limit, two guarded Txns (impl=raw2txn; impl=raw, a read and a
// Txn each, where that was not run); the same limit with a watch of the
// root per client (raw2txn-watched), and snapmeta without the cache, are
// shown beside it.
func clientsTarget(r *results, what string) target {
	const g = "BenchmarkEtcdClients/clients=32"
	return target{
		what: what, goal: "≥ 0.90x throughput",
		value: func() (float64, string) {
			ref := "raw2txn"
			if math.IsNaN(r.getImpl(g, ref, "ns/op")) {
				ref = "raw"
			}
			refNs := r.getImpl(g, ref, "ns/op")
			v := refNs / r.getImpl(g, "snapmeta-cache", "ns/op")
			text := fmt.Sprintf("%s throughput of %s (%s tx/s)", fmtRatio(v), ref, fmtNum(1e9/refNs))
			if math.IsNaN(v) {
				text = "snapmeta-cache not measured"
			}
			if w := r.getImpl(g, "raw2txn-watched", "ns/op"); !math.IsNaN(w) && !math.IsNaN(v) {
				text += fmt.Sprintf("; the limit with a watch per client is %s of it, snapmeta-cache %s of that",
					fmtRatio(refNs/w), fmtRatio(w/r.getImpl(g, "snapmeta-cache", "ns/op")))
			}
			if o := refNs / r.getImpl(g, ours, "ns/op"); !math.IsNaN(o) {
				text += fmt.Sprintf("; snapmeta without cache %s", fmtRatio(o))
			}
			return v, text
		},
		met: func(v float64) bool { return v >= 0.9 },
	}
}

// writeTargets writes the targets table: target, goal, measured, met.
func writeTargets(w io.Writer, ts []target) {
	fmt.Fprintln(w, "| target | goal | measured | met |")
	fmt.Fprintln(w, "| --- | --- | --- | --- |")
	for _, t := range ts {
		v, shown := t.value()
		met := "no"
		switch {
		case math.IsNaN(v) || math.IsInf(v, 0):
			met = "not measured"
			if !strings.Contains(shown, "not measured") {
				shown = "–"
			}
		case t.met(v):
			met = "yes"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", t.what, t.goal, shown, met)
	}
	fmt.Fprintln(w)
}
