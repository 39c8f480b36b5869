// Command benchchart turns the output of the storage benchmarks
// (go test -bench, any -count) into a write-throughput chart and a table of
// ratios against the references. It has no dependencies.
//
//	benchchart svg   [-o out.svg] [bench.txt ...]   line chart: tx/s against concurrent writers
//	benchchart table [bench.txt ...]                markdown: medians, ratios, targets
//
// With no file it reads standard input. Every sub-benchmark named
// .../impl=<name> is compared with the reference of its benchmark: impl=
// containerd for the Bolt benchmarks, impl=raw for the Etcd ones. Values are
// medians over the runs (-count).
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
	switch os.Args[1] {
	case "svg":
		fs := flag.NewFlagSet("svg", flag.ExitOnError)
		out := fs.String("o", "", "write the SVG to this file (default standard output)")
		_ = fs.Parse(os.Args[2:])
		res := mustRead(fs.Args())
		w := io.Writer(os.Stdout)
		if *out != "" {
			f, err := os.Create(*out)
			check(err)
			defer f.Close()
			w = f
		}
		check(writeSVG(w, res))
	case "table":
		fs := flag.NewFlagSet("table", flag.ExitOnError)
		_ = fs.Parse(os.Args[2:])
		check(writeTable(os.Stdout, mustRead(fs.Args())))
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: benchchart svg [-o out.svg] [bench.txt ...]\n       benchchart table [bench.txt ...]")
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
}

func mustRead(files []string) *results {
	res := &results{vals: map[string]map[string][]float64{}}
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

// splitImpl splits "BenchmarkX/a=1/impl=y" into "BenchmarkX/a=1" and "y".
func splitImpl(name string) (group, impl string) {
	i := strings.LastIndex(name, "/impl=")
	if i < 0 {
		return name, ""
	}
	return name[:i], name[i+len("/impl="):]
}

func reference(group string) string {
	if strings.HasPrefix(group, "BenchmarkEtcd") {
		return "raw"
	}
	return "containerd"
}

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
var extraUnits = []string{"tx/s", "roundtrips/op", "peak-heap-MiB", "peak-live-MiB", "base-live-MiB"}

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
	fmt.Fprintln(w, "| benchmark | vs | time/op (ref → snapmeta) | time ratio | allocs/op (ref → snapmeta) | B/op (ref → snapmeta) | other (ref → snapmeta) |")
	fmt.Fprintln(w, "| --- | --- | --- | ---: | --- | --- | --- |")
	for _, g := range groups {
		ref := reference(g)
		rn, on := g+"/impl="+ref, g+"/impl="+ours
		rt, ot := r.get(rn, "ns/op"), r.get(on, "ns/op")
		var other []string
		for _, u := range extraUnits {
			rv, ov := r.get(rn, u), r.get(on, u)
			if math.IsNaN(rv) && math.IsNaN(ov) {
				continue
			}
			other = append(other, u+" "+pair(rv, ov, fmtNum))
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n",
			strings.TrimPrefix(g, "Benchmark"), ref, pair(rt, ot, fmtTime), fmtRatio(ot/rt),
			pair(r.get(rn, "allocs/op"), r.get(on, "allocs/op"), fmtNum),
			pair(r.get(rn, "B/op"), r.get(on, "B/op"), fmtNum),
			strings.Join(other, "; "))
	}
	fmt.Fprintln(w)
	return writeTargets(w, r)
}

// A target is one figure of the issue, checked against the medians.
type target struct {
	what  string
	goal  string
	value func(r *results) (float64, string) // the figure and how to show it
	met   func(v float64) bool
}

func timeRatio(group string) func(r *results) (float64, string) {
	return func(r *results) (float64, string) {
		v := r.get(group+"/impl="+ours, "ns/op") / r.get(group+"/impl="+reference(group), "ns/op")
		return v, fmtRatio(v) + " time"
	}
}

func throughputRatio(group string) func(r *results) (float64, string) {
	return func(r *results) (float64, string) {
		v := r.get(group+"/impl="+reference(group), "ns/op") / r.get(group+"/impl="+ours, "ns/op")
		return v, fmtRatio(v) + " throughput"
	}
}

// worstTimeRatio is the largest time ratio among the groups present.
func worstTimeRatio(groups ...string) func(r *results) (float64, string) {
	return func(r *results) (float64, string) {
		worst, at := math.NaN(), ""
		for _, g := range groups {
			v, _ := timeRatio(g)(r)
			if !math.IsNaN(v) && (math.IsNaN(worst) || v > worst) {
				worst, at = v, strings.TrimPrefix(g, "Benchmark")
			}
		}
		return worst, fmt.Sprintf("%s time (worst: %s)", fmtRatio(worst), at)
	}
}

var targets = []target{
	{"bbolt, 1 writer, vs containerd", "≤ 1.05x time", timeRatio("BenchmarkBoltWriteTx/writers=1"), func(v float64) bool { return v <= 1.05 }},
	{"bbolt, 16 writers, vs containerd", "≥ 5x throughput", throughputRatio("BenchmarkBoltWriteTx/writers=16"), func(v float64) bool { return v >= 5 }},
	{"bbolt GetSnapshot, depth 128, vs containerd", "≤ 0.25x time", timeRatio("BenchmarkBoltGetSnapshot/depth=128"), func(v float64) bool { return v <= 0.25 }},
	{"etcd create+commit, 32 clients, vs raw", "≥ 0.70x throughput", throughputRatio("BenchmarkEtcdClients/clients=32"), func(v float64) bool { return v >= 0.70 }},
	{"etcd read-only ops vs one raw Get", "≤ 1.2x time", worstTimeRatio(
		"BenchmarkEtcdStatActive", "BenchmarkEtcdStatCommitted",
		"BenchmarkEtcdGetSnapshot/depth=1", "BenchmarkEtcdGetSnapshot/depth=32", "BenchmarkEtcdGetSnapshot/depth=128"),
		func(v float64) bool { return v <= 1.2 }},
	{"etcd walk of 100k snapshots, peak heap", "< 64 MiB", func(r *results) (float64, string) {
		n := "BenchmarkEtcdWalk100k/impl=" + ours
		v := r.get(n, "peak-heap-MiB")
		raw := "BenchmarkEtcdWalk100k/impl=raw"
		return v, fmt.Sprintf("%s MiB HeapInuse, %s MiB live (raw: %s, %s; live heap before: %s MiB)",
			fmtNum(v), fmtNum(r.get(n, "peak-live-MiB")),
			fmtNum(r.get(raw, "peak-heap-MiB")), fmtNum(r.get(raw, "peak-live-MiB")), fmtNum(r.get(n, "base-live-MiB")))
	}, func(v float64) bool { return v < 64 }},
}

func writeTargets(w io.Writer, r *results) error {
	fmt.Fprintln(w, "| target | goal | measured | met |")
	fmt.Fprintln(w, "| --- | --- | --- | --- |")
	for _, t := range targets {
		v, shown := t.value(r)
		met := "no"
		switch {
		case math.IsNaN(v):
			met, shown = "not measured", "–"
		case t.met(v):
			met = "yes"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", t.what, t.goal, shown, met)
	}
	return nil
}

// ---------------------------------------------------------------------------
// Chart.
// ---------------------------------------------------------------------------

type point struct{ x, y float64 }

type series struct {
	label  string
	color  string
	dashed bool
	points []point
}

var concurrency = regexp.MustCompile(`/(?:writers|clients)=(\d+)$`)

// throughput collects tx/s (from ns/op) against the concurrency of the
// group prefix's sub-benchmarks for one implementation.
func (r *results) throughput(prefix, impl string) []point {
	var pts []point
	for _, name := range r.order {
		g, im := splitImpl(name)
		if im != impl || !strings.HasPrefix(g, prefix) {
			continue
		}
		m := concurrency.FindStringSubmatch(g)
		if m == nil {
			continue
		}
		x, _ := strconv.ParseFloat(m[1], 64)
		if ns := r.get(name, "ns/op"); ns > 0 {
			pts = append(pts, point{x, 1e9 / ns})
		}
	}
	sort.Slice(pts, func(i, j int) bool { return pts[i].x < pts[j].x })
	return pts
}

func writeSVG(w io.Writer, r *results) error {
	all := []series{
		{"containerd's store (bbolt)", "#d9822b", false, r.throughput("BenchmarkBoltWriteTx/", "containerd")},
		{"snapmeta, bbolt engine", "#2b6cb0", false, r.throughput("BenchmarkBoltWriteTx/", ours)},
		{"snapmeta, etcd engine", "#2f855a", false, r.throughput("BenchmarkEtcdClients/", ours)},
		{"raw etcd calls (reference)", "#68d391", true, r.throughput("BenchmarkEtcdClients/", "raw")},
	}
	var ss []series
	for _, s := range all {
		if len(s.points) > 0 {
			ss = append(ss, s)
		}
	}
	if len(ss) == 0 {
		return fmt.Errorf("no BenchmarkBoltWriteTx or BenchmarkEtcdClients results")
	}

	const (
		width, height          = 760, 440
		left, right, top, bott = 80, 220, 56, 56
		pw, ph                 = width - left - right, height - top - bott
	)
	xmin, xmax := math.Inf(1), math.Inf(-1)
	ymin, ymax := math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		for _, p := range s.points {
			xmin, xmax = math.Min(xmin, p.x), math.Max(xmax, p.x)
			ymin, ymax = math.Min(ymin, p.y), math.Max(ymax, p.y)
		}
	}
	if xmax == xmin {
		xmax = xmin * 2
	}
	// x: log2 of the concurrency. y: log10 when the values span more than
	// a factor of 30, else linear from zero.
	logY := ymax/ymin > 30
	var yticks []float64
	var ylo, yhi float64
	if logY {
		ylo, yhi = math.Pow(10, math.Floor(math.Log10(ymin))), math.Pow(10, math.Ceil(math.Log10(ymax)))
		for d := ylo; d <= yhi*1.0001; d *= 10 {
			for _, m := range []float64{1, 2, 5} {
				if v := d * m; v >= ylo && v <= yhi*1.0001 {
					yticks = append(yticks, v)
				}
			}
		}
	} else {
		step := niceStep(ymax / 5)
		ylo, yhi = 0, math.Ceil(ymax/step)*step
		for v := 0.0; v <= yhi+step/2; v += step {
			yticks = append(yticks, v)
		}
	}
	px := func(x float64) float64 {
		return left + pw*(math.Log2(x)-math.Log2(xmin))/(math.Log2(xmax)-math.Log2(xmin))
	}
	py := func(y float64) float64 {
		if logY {
			return top + ph*(1-(math.Log10(y)-math.Log10(ylo))/(math.Log10(yhi)-math.Log10(ylo)))
		}
		return top + ph*(1-(y-ylo)/(yhi-ylo))
	}

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">Write throughput: create+commit transactions</text>`+"\n", left)
	fmt.Fprintf(&b, `<text x="%d" y="40" fill="#555">bbolt: fsync per commit; etcd: one embedded member (no fsync), one client per writer</text>`+"\n", left)
	// Grid and y axis.
	for _, v := range yticks {
		y := py(v)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e2e2e2"/>`+"\n", left, y, left+pw, y)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", left-6, y, fmtNum(v))
	}
	// x ticks: every concurrency measured.
	var xs []float64
	for _, s := range ss {
		for _, p := range s.points {
			if !slices.Contains(xs, p.x) {
				xs = append(xs, p.x)
			}
		}
	}
	sort.Float64s(xs)
	for _, x := range xs {
		X := px(x)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#e2e2e2"/>`+"\n", X, top, X, top+ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", X, top+ph+18, fmtNum(x))
	}
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#888"/>`+"\n", left, top, pw, ph)
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">concurrent writers (goroutines for bbolt, clients for etcd)</text>`+"\n", left+pw/2, height-14)
	scale := "linear"
	if logY {
		scale = "log scale"
	}
	fmt.Fprintf(&b, `<text transform="translate(18 %d) rotate(-90)" text-anchor="middle">transactions per second (%s)</text>`+"\n", top+ph/2, scale)
	// Series.
	for i, s := range ss {
		var pts []string
		for _, p := range s.points {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(p.x), py(p.y)))
		}
		dash := ""
		if s.dashed {
			dash = ` stroke-dasharray="6 4"`
		}
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2.5"%s/>`+"\n", strings.Join(pts, " "), s.color, dash)
		for _, p := range s.points {
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="4" fill="%s"><title>%s, %s: %s tx/s</title></circle>`+"\n",
				px(p.x), py(p.y), s.color, xmlEscape(s.label), fmtNum(p.x), fmtNum(p.y))
		}
		// Legend.
		ly := top + 10 + i*22
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2.5"%s/>`+"\n", left+pw+16, ly, left+pw+40, ly, s.color, dash)
		fmt.Fprintf(&b, `<text x="%d" y="%d" dominant-baseline="middle">%s</text>`+"\n", left+pw+46, ly, xmlEscape(s.label))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// niceStep rounds a raw tick step up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func xmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;").Replace(s)
}
