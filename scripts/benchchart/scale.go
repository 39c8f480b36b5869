package main

import (
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// BenchmarkScale's results: BenchmarkScale/n=<size>/engine=<e>/<op>, each
// with ns/snapshot (and peak-heap-MiB for the walks).
var scaleName = regexp.MustCompile(`^BenchmarkScale/n=(\d+)/engine=([^/]+)/([^/]+)$`)

// scaleOps is the order operations are shown in, with their colours.
var scaleOps = []struct{ name, color string }{
	{"create", "#d9822b"},
	{"GetSnapshot", "#805ad5"},
	{"walk", "#2b6cb0"},
	{"Check", "#c53030"},
	{"export", "#2f855a"},
	{"migrate", "#718096"},
}

// scaleData is the median of unit per engine, operation and size.
type scaleData struct {
	sizes   []float64
	engines []string
	vals    map[string]map[string]map[float64]float64 // engine, op, size
}

func (r *results) scale(unit string) *scaleData {
	d := &scaleData{vals: map[string]map[string]map[float64]float64{}}
	for _, name := range r.order {
		m := scaleName.FindStringSubmatch(name)
		if m == nil {
			continue
		}
		v := r.get(name, unit)
		if math.IsNaN(v) {
			continue
		}
		n, _ := strconv.ParseFloat(m[1], 64)
		eng, op := m[2], m[3]
		if d.vals[eng] == nil {
			d.vals[eng] = map[string]map[float64]float64{}
			d.engines = append(d.engines, eng)
		}
		if d.vals[eng][op] == nil {
			d.vals[eng][op] = map[float64]float64{}
		}
		d.vals[eng][op][n] = v
		if !slices.Contains(d.sizes, n) {
			d.sizes = append(d.sizes, n)
		}
	}
	sort.Float64s(d.sizes)
	return d
}

// growth is the ratio of the value at the largest size to the one at the
// smallest, with both sizes; NaN when fewer than two sizes have one.
func (d *scaleData) growth(eng, op string) (ratio, from, to float64) {
	byN := d.vals[eng][op]
	from, to = math.NaN(), math.NaN()
	for _, n := range d.sizes {
		if _, ok := byN[n]; ok {
			if math.IsNaN(from) {
				from = n
			}
			to = n
		}
	}
	if math.IsNaN(from) || from == to {
		return math.NaN(), from, to
	}
	return byN[to] / byN[from], from, to
}

// writeScaleSVG draws ns/snapshot against the store's size, one line per
// operation and engine (bbolt solid, etcd dashed).
func writeScaleSVG(w io.Writer, r *results) error {
	d := r.scale("ns/snapshot")
	var ss []series
	for _, eng := range d.engines {
		for _, op := range scaleOps {
			byN := d.vals[eng][op.name]
			var pts []point
			for _, n := range d.sizes {
				if v, ok := byN[n]; ok && v > 0 {
					pts = append(pts, point{n, v})
				}
			}
			ss = append(ss, series{label: eng + " " + op.name, color: op.color, dashed: eng != "bolt", points: pts})
		}
	}
	return writeChart(w, chart{
		title:    "Cost per snapshot against the store's size",
		subtitle: "flat lines: cost grows with the work; bbolt solid, etcd dashed",
		xlabel:   "snapshots in the store (log scale)",
		ylabel:   "time per snapshot",
		xBase:    10,
		yUnit:    "ns/snapshot",
		yFmt:     fmtTime,
		series:   ss,
	})
}

// writeScaleTable writes, per engine and operation, ns/snapshot at each
// size and its growth from the smallest to the largest, then the peak
// heaps.
func writeScaleTable(w io.Writer, r *results) error {
	d := r.scale("ns/snapshot")
	if len(d.sizes) == 0 {
		fmt.Fprintln(w, "(no BenchmarkScale results)")
		return nil
	}
	head, rule := sizeColumns(d.sizes)
	fmt.Fprintln(w, head+" growth |")
	fmt.Fprintln(w, rule+" ---: |")
	for _, eng := range d.engines {
		for _, op := range scaleOps {
			byN := d.vals[eng][op.name]
			if len(byN) == 0 {
				continue
			}
			row := "| " + eng + " | " + op.name + " |"
			for _, n := range d.sizes {
				v, ok := byN[n]
				if !ok {
					v = math.NaN()
				}
				row += " " + fmtTime(v) + " |"
			}
			g, _, _ := d.growth(eng, op.name)
			fmt.Fprintln(w, row+" "+fmtRatio(g)+" |")
		}
	}
	fmt.Fprintln(w)
	heap := r.scale("peak-heap-MiB")
	live := r.scale("peak-live-MiB")
	rss := r.scale("server-rss-MiB")
	if len(heap.sizes) == 0 {
		return nil
	}
	fmt.Fprintln(w, "Peak heap above the heap before the operation, MiB (HeapInuse / live), and the etcd server's resident memory after the build when it ran in its own process:")
	fmt.Fprintln(w)
	head, rule = sizeColumns(heap.sizes)
	fmt.Fprintln(w, head)
	fmt.Fprintln(w, rule)
	for _, eng := range heap.engines {
		for _, op := range scaleOps {
			byN := heap.vals[eng][op.name]
			if len(byN) == 0 {
				continue
			}
			row := "| " + eng + " | " + op.name + " |"
			for _, n := range heap.sizes {
				h, ok := byN[n]
				if !ok {
					row += " – |"
					continue
				}
				row += fmt.Sprintf(" %s / %s |", fmtNum(h), fmtNum(live.vals[eng][op.name][n]))
			}
			fmt.Fprintln(w, row)
		}
		if byN := rss.vals[eng]["create"]; len(byN) > 0 {
			row := "| " + eng + " | server RSS |"
			for _, n := range heap.sizes {
				if v, ok := byN[n]; ok {
					row += " " + fmtNum(v) + " |"
				} else {
					row += " – |"
				}
			}
			fmt.Fprintln(w, row)
		}
	}
	fmt.Fprintln(w)
	return nil
}

// scaleTargets are issue 16's scale targets: per engine, the worst growth
// of ns/snapshot from the smallest size to the largest, every operation's
// shown.
func scaleTargets(r *results) []target {
	if r == nil {
		return []target{{what: "scale: ns/snapshot growth, 10k → largest size", goal: "≤ 2x per operation",
			value: func() (float64, string) { return math.NaN(), "" }, met: func(float64) bool { return false }}}
	}
	d := r.scale("ns/snapshot")
	engines := d.engines
	if len(engines) == 0 {
		engines = []string{"bolt", "etcd"}
	}
	var ts []target
	for _, eng := range engines {
		worst, at, from, to := math.NaN(), "", math.NaN(), math.NaN()
		var parts []string
		for _, op := range scaleOps {
			g, f, t := d.growth(eng, op.name)
			if math.IsNaN(g) {
				continue
			}
			parts = append(parts, op.name+" "+fmtRatio(g))
			if math.IsNaN(worst) || g > worst {
				worst, at, from, to = g, op.name, f, t
			}
		}
		ts = append(ts, heapTargets(r, eng)...)
		ts = append(ts, target{
			what: "scale (" + eng + "): ns/snapshot growth, smallest → largest size",
			goal: "≤ 2x per operation",
			value: func() (float64, string) {
				return worst, fmt.Sprintf("worst %s %s, n=%s → %s (%s)", at, fmtRatio(worst), fmtNum(from), fmtNum(to), strings.Join(parts, ", "))
			},
			met: func(v float64) bool { return v <= 2 },
		})
	}
	return ts
}

// heapTargets: at the largest size, the peak heap of walk and export, and
// that of Check, stay under 64 MiB (the 100k walk's target): memory
// bounded by a page, not by the store.
func heapTargets(r *results, eng string) []target {
	heap := r.scale("peak-heap-MiB")
	at := func(op string) (float64, float64, float64) {
		byN := heap.vals[eng][op]
		from, to := math.NaN(), math.NaN()
		for _, n := range heap.sizes {
			if _, ok := byN[n]; ok {
				if math.IsNaN(from) {
					from = n
				}
				to = n
			}
		}
		if math.IsNaN(to) {
			return math.NaN(), math.NaN(), math.NaN()
		}
		return byN[to], byN[from], to
	}
	mk := func(what string, ops ...string) target {
		return target{
			what: "scale (" + eng + "): " + what + " peak heap at the largest size",
			goal: "< 64 MiB",
			value: func() (float64, string) {
				worst := math.NaN()
				var parts []string
				for _, op := range ops {
					v, first, n := at(op)
					if math.IsNaN(v) {
						continue
					}
					parts = append(parts, fmt.Sprintf("%s %s MiB at n=%s (%s at the smallest)", op, fmtNum(v), fmtNum(n), fmtNum(first)))
					if math.IsNaN(worst) || v > worst {
						worst = v
					}
				}
				return worst, strings.Join(parts, "; ")
			},
			met: func(v float64) bool { return v < 64 },
		}
	}
	return []target{mk("walk and export", "walk", "export"), mk("Check", "Check")}
}

// sizeColumns is the head and rule of a table with a row per engine and
// operation and a column per size.
func sizeColumns(sizes []float64) (head, rule string) {
	head, rule = "| engine | operation |", "| --- | --- |"
	for _, n := range sizes {
		head += " n=" + fmtNum(n) + " |"
		rule += " ---: |"
	}
	return head, rule
}
