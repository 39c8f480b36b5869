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

type point struct{ x, y float64 }

type series struct {
	label  string
	color  string
	dashed bool
	points []point
}

// chart is a line chart: x on a log scale (base xBase), y on a log scale
// when its values span more than a factor of 30, else linear from zero.
type chart struct {
	title, subtitle string
	xlabel, ylabel  string
	xBase           float64
	yUnit           string               // in each point's tooltip
	yFmt            func(float64) string // the y ticks' labels; fmtNum when nil
	series          []series
}

var concurrency = regexp.MustCompile(`/(?:writers|clients)=(\d+)$`)

// throughput collects tx/s (from ns/op) of one implementation against the
// concurrency (writers=N or clients=N, the group's last element) of the
// groups under prefix. A group that is the prefix itself, without that
// element, is put at defaultX (0 for none): older output had one
// concurrency only.
func (r *results) throughput(prefix, impl string, defaultX float64) []point {
	var pts []point
	for _, name := range r.order {
		g, im := splitImpl(name)
		if im != impl || !strings.HasPrefix(g+"/", prefix) {
			continue
		}
		var x float64
		if m := concurrency.FindStringSubmatch(g); m != nil && strings.HasPrefix(g, prefix) {
			x, _ = strconv.ParseFloat(m[1], 64)
		} else if g+"/" == prefix && defaultX > 0 {
			x = defaultX
		} else {
			continue
		}
		if ns := r.get(name, "ns/op"); ns > 0 {
			pts = append(pts, point{x, 1e9 / ns})
		}
	}
	sort.Slice(pts, func(i, j int) bool { return pts[i].x < pts[j].x })
	return pts
}

func writeSVG(w io.Writer, r *results) error {
	return writeChart(w, chart{
		title:    "Write throughput: create+commit transactions",
		subtitle: "bbolt: fsync per commit; etcd: one embedded fsyncing member, one client per writer",
		xlabel:   "concurrent writers (goroutines for bbolt, clients for etcd)",
		ylabel:   "transactions per second",
		xBase:    2,
		yUnit:    "tx/s",
		series: []series{
			{"containerd's store (bbolt)", "#d9822b", false, r.throughput("BenchmarkBoltWriteTx/", "containerd", 0)},
			{"snapmeta, bbolt engine", "#2b6cb0", false, r.throughput("BenchmarkBoltWriteTx/", ours, 0)},
			{"raw bbolt, N writers' records per commit (ceiling)", "#a0aec0", true, r.throughput("BenchmarkBoltWriteTx/", "bbolt-ideal", 0)},
			{"raw bbolt, N writers' creates then commits per commit", "#718096", true, r.throughput("BenchmarkBoltWriteTx/", "bbolt-ideal-two-steps", 0)},
			{"snapmeta, etcd engine", "#2f855a", false, r.throughput("BenchmarkEtcdClients/", ours, 0)},
			{"raw etcd calls (reference)", "#68d391", true, r.throughput("BenchmarkEtcdClients/", "raw", 0)},
		},
	})
}

// writeChart draws c as SVG; series without points are left out, and a
// chart without any is an error.
func writeChart(w io.Writer, c chart) error {
	var ss []series
	for _, s := range c.series {
		if len(s.points) > 0 {
			ss = append(ss, s)
		}
	}
	if len(ss) == 0 {
		return fmt.Errorf("%s: no results to draw", c.title)
	}

	const (
		left, top, bott, pw = 80, 56, 56, 450
		legendStep          = 20
	)
	// The legend's width follows its longest label (about 7 px a
	// character at 12 px).
	longest := 0
	for _, s := range ss {
		longest = max(longest, len([]rune(s.label)))
	}
	right := 56 + 7*longest
	width := left + pw + right
	height := max(440, top+10+len(ss)*legendStep+bott)
	ph := height - top - bott
	yFmt := c.yFmt
	if yFmt == nil {
		yFmt = fmtNum
	}
	xmin, xmax := math.Inf(1), math.Inf(-1)
	ymin, ymax := math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		for _, p := range s.points {
			xmin, xmax = math.Min(xmin, p.x), math.Max(xmax, p.x)
			ymin, ymax = math.Min(ymin, p.y), math.Max(ymax, p.y)
		}
	}
	if xmax == xmin {
		xmax = xmin * c.xBase
	}
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
	lx := func(x float64) float64 { return math.Log(x) / math.Log(c.xBase) }
	px := func(x float64) float64 {
		return float64(left) + float64(pw)*(lx(x)-lx(xmin))/(lx(xmax)-lx(xmin))
	}
	py := func(y float64) float64 {
		if logY {
			return float64(top) + float64(ph)*(1-(math.Log10(y)-math.Log10(ylo))/(math.Log10(yhi)-math.Log10(ylo)))
		}
		return float64(top) + float64(ph)*(1-(y-ylo)/(yhi-ylo))
	}

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", left, xmlEscape(c.title))
	fmt.Fprintf(&b, `<text x="%d" y="40" fill="#555">%s</text>`+"\n", left, xmlEscape(c.subtitle))
	// Grid and y axis.
	for _, v := range yticks {
		y := py(v)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e2e2e2"/>`+"\n", left, y, left+pw, y)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", left-6, y, yFmt(v))
	}
	// x ticks: every x measured.
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
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", left+pw/2, height-14, xmlEscape(c.xlabel))
	scale := "linear"
	if logY {
		scale = "log scale"
	}
	fmt.Fprintf(&b, `<text transform="translate(18 %d) rotate(-90)" text-anchor="middle">%s (%s)</text>`+"\n", top+ph/2, xmlEscape(c.ylabel), scale)
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
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="4" fill="%s"><title>%s, %s: %s %s</title></circle>`+"\n",
				px(p.x), py(p.y), s.color, xmlEscape(s.label), fmtNum(p.x), fmtNum(p.y), xmlEscape(c.yUnit))
		}
		// Legend.
		ly := top + 10 + i*legendStep
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
