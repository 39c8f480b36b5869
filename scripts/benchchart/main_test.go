package main

import (
	"encoding/xml"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
)

const sample = `goos: linux
BenchmarkBoltWriteTx/writers=16/impl=containerd-2   	 100	 2000000 ns/op	 500 tx/s	 250 allocs/op
BenchmarkBoltWriteTx/writers=16/impl=snapmeta-2     	 100	  200000 ns/op	 5000 tx/s	 200 allocs/op
BenchmarkBoltWriteTx/writers=16/impl=bbolt-ideal-2  	 100	  160000 ns/op	 6250 tx/s	 100 allocs/op
BenchmarkBoltWriteTx/writers=16/impl=bbolt-ideal-two-steps-2  	 100	  250000 ns/op	 4000 tx/s	 150 allocs/op
BenchmarkBoltPrepareCommitWithWork/work=sleep2ms/writers=16/impl=containerd-2 	 10	 8000000 ns/op
BenchmarkBoltPrepareCommitWithWork/work=sleep2ms/writers=16/impl=snapmeta-2 	 10	 4000000 ns/op
BenchmarkBoltPrepareCommitWithWork/work=sleep2ms/writers=16/impl=snapmeta-parallel-2 	 10	 500000 ns/op
BenchmarkBoltOpen/snapshots=10000/impl=containerd-2 	 100	 200000 ns/op
BenchmarkBoltOpen/snapshots=10000/impl=snapmeta-2 	 100	 10000000 ns/op
BenchmarkBoltOpen/snapshots=10000/impl=read-file-2 	 100	 5000000 ns/op
BenchmarkBoltDeepChain/impl=containerd/file-2 	 1	 10 ns/op	 4.0 file-MiB
BenchmarkBoltDeepChain/impl=snapmeta/file-2   	 1	 10 ns/op	 5.0 file-MiB
BenchmarkScale/n=10000/engine=bolt/walk-2 	 1	 1 ns/op	 2000 ns/snapshot	 3 peak-heap-MiB	 1 peak-live-MiB
BenchmarkScale/n=1000000/engine=bolt/walk-2 	 1	 1 ns/op	 3000 ns/snapshot	 4 peak-heap-MiB	 1 peak-live-MiB
`

func read(t *testing.T, s string) *results {
	t.Helper()
	r := &results{vals: map[string]map[string][]float64{}, names: map[string]map[string]string{}}
	if err := r.parse(strings.NewReader(s)); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestSplitImpl(t *testing.T) {
	for _, tc := range []struct{ name, group, impl string }{
		{"BenchmarkX/a=1/impl=y", "BenchmarkX/a=1", "y"},
		{"BenchmarkX/impl=y/file", "BenchmarkX/file", "y"},
		{"BenchmarkX/a=1", "BenchmarkX/a=1", ""},
	} {
		if g, i := splitImpl(tc.name); g != tc.group || i != tc.impl {
			t.Errorf("splitImpl(%q) = %q, %q; want %q, %q", tc.name, g, i, tc.group, tc.impl)
		}
	}
}

func TestTableComparesEveryImplWithTheReference(t *testing.T) {
	r := read(t, sample)
	var b strings.Builder
	if err := writeTable(&b, r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| BoltWriteTx/writers=16 | snapmeta vs containerd | 2.00 ms → 200.0 µs | 0.10x |",
		"| BoltPrepareCommitWithWork/work=sleep2ms/writers=16 | snapmeta-parallel vs containerd | 8.00 ms → 500.0 µs | 0.06x |",
		"| BoltDeepChain/file | snapmeta vs containerd |",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

func TestTargets(t *testing.T) {
	r := read(t, sample)
	got := map[string]string{}
	for _, tg := range issue16Targets(r, nil, r) {
		v, shown := tg.value()
		met := "not measured"
		if !math.IsNaN(v) {
			met = map[bool]string{true: "yes", false: "no"}[tg.met(v)]
		}
		got[tg.what] = met + ": " + shown
	}
	if w, got := "bbolt's ceiling (bbolt-ideal) is 12.50x, snapmeta 0.80x of it; for the writes of a create then a commit (bbolt-ideal-two-steps) 8.00x, snapmeta 1.25x of it", got["bbolt create+commit, 16 writers, vs containerd"]; !strings.Contains(got, w) {
		t.Errorf("16 writers: %q, want it to show %q", got, w)
	}
	if w, got := "worst: BoltOpen/snapshots=10000, 50.00x time; reading the file alone takes 25.00x, snapmeta 2.00x of that", got["every bbolt benchmark (snapmeta) vs containerd"]; got != "no: "+w {
		t.Errorf("every bbolt benchmark: %q, want %q", got, "no: "+w)
	}
	for what, want := range map[string]string{
		"bbolt Prepare+Commit, 2 ms of work in the callback, 16 writers: snapmeta-parallel vs containerd": "yes: 16.00x",
		"bbolt create+commit, 16 writers, vs containerd":                                                  "yes: 10.00x",
		"bbolt create+commit, 64 writers, vs containerd":                                                  "not measured",
		"bbolt chain of depth 10,000: file size vs containerd":                                            "yes: 1.25x",
		"scale (bolt): ns/snapshot growth, smallest → largest size":                                       "yes: worst walk 1.50x",
		"etcd Prepare+Commit, 32 clients: snapmeta-cache vs raw":                                          "not measured",
	} {
		if !strings.HasPrefix(got[what], want) {
			t.Errorf("%s: %q, want it to begin with %q", what, got[what], want)
		}
	}
}

func TestChartsAreXML(t *testing.T) {
	r := read(t, sample)
	for name, draw := range map[string]func(io.Writer) error{
		"svg":      func(w io.Writer) error { return writeSVG(w, r) },
		"parallel": func(w io.Writer) error { return writeParallelSVG(w, r) },
		"scale":    func(w io.Writer) error { return writeScaleSVG(w, r) },
	} {
		var b strings.Builder
		if err := draw(&b); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		d := xml.NewDecoder(strings.NewReader(b.String()))
		for {
			_, err := d.Token()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
	}
	if err := writeClientsSVG(io.Discard, r, nil); err == nil {
		t.Error("a chart without results is an error")
	}
}
