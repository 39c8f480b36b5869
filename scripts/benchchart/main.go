// Command benchchart turns the output of the storage benchmarks
// (go test -bench, any -count) into charts and tables of ratios against the
// references. It has no dependencies.
//
//	benchchart table    [-cluster3 f] [-scale f] [-targets=false] [bench.txt ...]
//	                    markdown: medians, ratios, then issue 16's targets
//	benchchart svg      [-o out.svg] [bench.txt ...]   tx/s against concurrent writers
//	benchchart parallel [-o out.svg] [bench.txt ...]   Prepare+Commit with work, against writers
//	benchchart clients  [-o out.svg] [-cluster3 f] [bench.txt ...]   etcd Prepare+Commit against clients
//	benchchart scale    [-o out.svg] [-table] [scale.txt ...]   ns/snapshot against the store's size
//
// With no file it reads standard input. Every sub-benchmark named
// .../impl=<name>[/...] is compared with the reference of its benchmark:
// impl=containerd for the Bolt benchmarks, impl=raw for the Etcd ones.
// Values are medians over the runs (-count). -cluster3 names the output of
// the etcd benchmarks on a 3-member cluster, -scale BenchmarkScale's.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	out := fs.String("o", "", "write the SVG to this file (default standard output)")
	cluster3 := fs.String("cluster3", "", "output of the etcd benchmarks on a 3-member cluster")
	scale := fs.String("scale", "", "output of BenchmarkScale")
	withTargets := fs.Bool("targets", true, "table: end with issue 16's targets")
	scaleTable := fs.Bool("table", false, "scale: write the markdown table instead of the chart")
	_ = fs.Parse(os.Args[2:])
	optional := func(file string) *results {
		if file == "" {
			return nil
		}
		return mustRead([]string{file})
	}
	svg := func(draw func(io.Writer) error) {
		w := io.Writer(os.Stdout)
		if *out != "" {
			f, err := os.Create(*out)
			check(err)
			defer f.Close()
			w = f
		}
		check(draw(w))
	}
	switch os.Args[1] {
	case "svg":
		res := mustRead(fs.Args())
		svg(func(w io.Writer) error { return writeSVG(w, res) })
	case "parallel":
		res := mustRead(fs.Args())
		svg(func(w io.Writer) error { return writeParallelSVG(w, res) })
	case "clients":
		res, r3 := mustRead(fs.Args()), optional(*cluster3)
		svg(func(w io.Writer) error { return writeClientsSVG(w, res, r3) })
	case "scale":
		res := mustRead(fs.Args())
		if *scaleTable {
			check(writeScaleTable(os.Stdout, res))
			return
		}
		svg(func(w io.Writer) error { return writeScaleSVG(w, res) })
	case "table":
		res := mustRead(fs.Args())
		check(writeTable(os.Stdout, res))
		if *withTargets {
			writeTargets(os.Stdout, issue16Targets(res, optional(*cluster3), optional(*scale)))
		}
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: benchchart table [-cluster3 f] [-scale f] [-targets=false] [bench.txt ...]
       benchchart svg|parallel [-o out.svg] [bench.txt ...]
       benchchart clients [-o out.svg] [-cluster3 f] [bench.txt ...]
       benchchart scale [-o out.svg] [-table] [scale.txt ...]`)
	os.Exit(2)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchchart:", err)
		os.Exit(1)
	}
}

// results maps a benchmark's full name (without the -GOMAXPROCS suffix) to
// its values per unit, one per run.
type results struct {
	order []string
	vals  map[string]map[string][]float64
	names map[string]map[string]string // group, impl -> name
}

func mustRead(files []string) *results {
	res := &results{vals: map[string]map[string][]float64{}, names: map[string]map[string]string{}}
	if len(files) == 0 {
		check(res.parse(os.Stdin))
		return res
	}
	for _, name := range files {
		f, err := os.Open(name)
		check(err)
		check(res.parse(f))
		f.Close()
	}
	return res
}

var procsSuffix = regexp.MustCompile(`-\d+$`)

// parse reads benchmark result lines: name, iterations, then value-unit
// pairs. Anything else is ignored.
func (r *results) parse(rd io.Reader) error {
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue
		}
		name := procsSuffix.ReplaceAllString(f[0], "")
		m := r.vals[name]
		if m == nil {
			m = map[string][]float64{}
			r.vals[name] = m
			r.order = append(r.order, name)
			if g, impl := splitImpl(name); impl != "" {
				if r.names[g] == nil {
					r.names[g] = map[string]string{}
				}
				r.names[g][impl] = name
			}
		}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				break
			}
			m[f[i+1]] = append(m[f[i+1]], v)
		}
	}
	return sc.Err()
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// get returns the median of unit for a benchmark, NaN when absent.
func (r *results) get(name, unit string) float64 {
	return median(r.vals[name][unit])
}

// splitImpl takes the impl=<name> element out of a benchmark's name:
// "BenchmarkX/a=1/impl=y" gives "BenchmarkX/a=1" and "y",
// "BenchmarkX/impl=y/file" gives "BenchmarkX/file" and "y".
func splitImpl(name string) (group, impl string) {
	i := strings.Index(name, "/impl=")
	if i < 0 {
		return name, ""
	}
	rest := name[i+len("/impl="):]
	if j := strings.IndexByte(rest, '/'); j >= 0 {
		return name[:i] + rest[j:], rest[:j]
	}
	return name[:i], rest
}

// name is the full name of group's sub-benchmark for impl, "" when absent.
func (r *results) name(group, impl string) string {
	return r.names[group][impl]
}

// getImpl is the median of unit for group's impl, NaN when absent.
func (r *results) getImpl(group, impl, unit string) float64 {
	return r.get(r.name(group, impl), unit)
}

// impls lists group's implementations other than its reference, in the
// order they ran.
func (r *results) impls(group string) []string {
	var out []string
	for _, name := range r.order {
		g, impl := splitImpl(name)
		if g == group && impl != "" && impl != reference(group) && !slices.Contains(out, impl) {
			out = append(out, impl)
		}
	}
	return out
}

func reference(group string) string {
	if strings.HasPrefix(group, "BenchmarkEtcd") {
		return "raw"
	}
	return "containerd"
}

// ours is this package's default mode; snapmeta-parallel (bbolt,
// WithParallelCallbacks) and snapmeta-cache (etcd, the watch-fed cache)
// are compared with the same references.
const ours = "snapmeta"

// ---------------------------------------------------------------------------
// Table.
// ---------------------------------------------------------------------------

func fmtTime(ns float64) string {
	switch {
	case math.IsNaN(ns):
		return "–"
	case ns >= 1e9:
		return fmt.Sprintf("%.2f s", ns/1e9)
	case ns >= 1e6:
		return fmt.Sprintf("%.2f ms", ns/1e6)
	case ns >= 1e3:
		return fmt.Sprintf("%.1f µs", ns/1e3)
	}
	return fmt.Sprintf("%.0f ns", ns)
}

func fmtNum(v float64) string {
	switch {
	case math.IsNaN(v):
		return "–"
	case v >= 1e6:
		return fmt.Sprintf("%.1fM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.0fk", v/1e3)
	case v == math.Trunc(v):
		return fmt.Sprintf("%.0f", v)
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.3g", v)
}

func fmtRatio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2fx", v)
}

func pair(ref, our float64, f func(float64) string) string {
	return f(ref) + " → " + f(our)
}

// extraUnits are reported besides time and allocations, when present.
var extraUnits = []string{"tx/s", "roundtrips/op", "peak-heap-MiB", "peak-live-MiB", "base-live-MiB", "file-MiB", "used-MiB"}

// writeTable writes one row per implementation of each benchmark against
// its reference.
func writeTable(w io.Writer, r *results) error {
	var groups []string
	seen := map[string]bool{}
	for _, name := range r.order {
		g, impl := splitImpl(name)
		if impl == "" || seen[g] {
			continue
		}
		seen[g] = true
		groups = append(groups, g)
	}
	fmt.Fprintln(w, "| benchmark | impl vs ref | time/op (ref → impl) | time ratio | allocs/op (ref → impl) | B/op (ref → impl) | other (ref → impl) |")
	fmt.Fprintln(w, "| --- | --- | --- | ---: | --- | --- | --- |")
	for _, g := range groups {
		ref := reference(g)
		for _, impl := range r.impls(g) {
			rn, on := r.name(g, ref), r.name(g, impl)
			rt, ot := r.get(rn, "ns/op"), r.get(on, "ns/op")
			var other []string
			for _, u := range extraUnits {
				rv, ov := r.get(rn, u), r.get(on, u)
				if math.IsNaN(rv) && math.IsNaN(ov) {
					continue
				}
				other = append(other, u+" "+pair(rv, ov, fmtNum))
			}
			fmt.Fprintf(w, "| %s | %s vs %s | %s | %s | %s | %s | %s |\n",
				strings.TrimPrefix(g, "Benchmark"), impl, ref, pair(rt, ot, fmtTime), fmtRatio(ot/rt),
				pair(r.get(rn, "allocs/op"), r.get(on, "allocs/op"), fmtNum),
				pair(r.get(rn, "B/op"), r.get(on, "B/op"), fmtNum),
				strings.Join(other, "; "))
		}
	}
	fmt.Fprintln(w)
	return nil
}
