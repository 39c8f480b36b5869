package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/spf13/pflag"
	"golang.org/x/term"
)

// How progress is shown. On a terminal a line is redrawn in place; elsewhere
// (a CI log, a file) a line is written at most once per --progress-interval.
// Either way nothing is written for a phase that ends before the first line
// is due, so a short command leaves stderr empty.
// ttyDelay is how long a phase runs before a terminal shows its line (a
// variable for tests).
var ttyDelay = 500 * time.Millisecond

const (
	// ttyRedraw is the least time between two redraws on a terminal.
	ttyRedraw = 100 * time.Millisecond
	// rateAfter is how long a phase runs before its rate is shown: the
	// rate of the first few records is noise (a walk's first page arrives
	// at once, and 6481669 snapshots/s helps nobody).
	rateAfter = time.Second
	// defaultProgressInterval is --progress-interval's default.
	defaultProgressInterval = 5 * time.Second
	// barWidth is the width of the bar drawn when the total is known.
	barWidth = 20
)

// isTerminal reports whether w is a terminal. Tests replace it to see what
// a terminal would show.
var isTerminal = func(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressFlags are the settings of progress output shared by every
// command.
type progressFlags struct {
	off      bool
	interval time.Duration
}

func (pf *progressFlags) addFlags(fs *pflag.FlagSet) {
	fs.BoolVar(&pf.off, "no-progress", false, "show no progress on stderr")
	fs.DurationVar(&pf.interval, "progress-interval", defaultProgressInterval,
		"when stderr is not a terminal: the least time between two progress lines (and before the first)")
}

// progress reports how far one phase of a long command is, on stderr: a
// count of items, their rate once rateAfter has passed, and, when the
// total is known, a percentage (and a bar on a terminal). Its methods may
// be called from any goroutine, and on a nil *progress (no progress wanted).
type progress struct {
	mu    sync.Mutex
	w     io.Writer
	tty   bool
	every time.Duration // not a terminal: the least time between lines
	width int           // a terminal's width (0: unknown): lines stay narrower
	now   func() time.Time
	label string // what the phase does, e.g. "export: reading"
	unit  string // what is counted, plural
	total int    // 0: unknown
	done  int
	start time.Time
	last  time.Time // of the last line written
	shown bool      // a line was written
	stop  chan struct{}
	ended chan struct{}
}

// newProgress makes the progress of one phase on w, without the ticker
// that redraws it while no item arrives (see startProgress).
func newProgress(w io.Writer, tty bool, every time.Duration, now func() time.Time, label, unit string, total int) *progress {
	return &progress{w: w, tty: tty, every: every, now: now, label: label, unit: unit, total: total, start: now()}
}

// startProgress begins a phase of a command: label says what it does,
// total is how many units it will count (0 when unknown). A ticker keeps
// the elapsed time current while the count does not move; finish stops
// it. It returns nil when progress is off.
func (a *app) startProgress(label string, total int) *progress {
	if a.progress.off {
		return nil
	}
	tty := isTerminal(a.stderr)
	p := newProgress(a.stderr, tty, a.progress.interval, time.Now, label, "snapshots", total)
	p.width = terminalWidth(a.stderr)
	period := ttyRedraw
	if !tty {
		period = min(max(a.progress.interval, 10*time.Millisecond), time.Second)
	}
	p.stop, p.ended = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(p.ended)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.tick()
			}
		}
	}()
	return p
}

// add counts n more units done.
func (p *progress) add(n int) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	p.drawIfDue()
}

// tick draws the line if one is due, with no new units.
func (p *progress) tick() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drawIfDue()
}

// finish ends the phase: when anything was shown, a summary line replaces
// it (ok: the phase completed; otherwise it stopped where it was).
func (p *progress) finish(ok bool) {
	if p == nil {
		return
	}
	if p.stop != nil {
		close(p.stop)
		<-p.ended
		p.stop = nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.shown {
		return
	}
	elapsed := p.now().Sub(p.start)
	var b strings.Builder
	b.WriteString(p.label)
	if ok {
		b.WriteString(": done")
	} else {
		b.WriteString(": stopped")
	}
	if p.done > 0 || p.total > 0 {
		fmt.Fprintf(&b, ", %d %s", p.done, p.unit)
	}
	b.WriteString(" in " + fmtElapsed(elapsed))
	if p.done > 0 && elapsed >= rateAfter {
		fmt.Fprintf(&b, " (%s %s/s)", fmtRate(p.done, elapsed), p.unit)
	}
	if p.tty {
		fmt.Fprintf(p.w, "\r%s\x1b[K\n", b.String())
	} else {
		fmt.Fprintln(p.w, b.String())
	}
}

// drawIfDue writes the line when it is due: on a terminal once ttyDelay
// has passed and then at most every ttyRedraw; elsewhere once every
// interval. The caller holds mu.
func (p *progress) drawIfDue() {
	now := p.now()
	elapsed := now.Sub(p.start)
	if p.tty {
		if elapsed < ttyDelay || (p.shown && now.Sub(p.last) < ttyRedraw) {
			return
		}
		fmt.Fprintf(p.w, "\r%s\x1b[K", p.fitted(elapsed))
	} else {
		since := elapsed
		if p.shown {
			since = now.Sub(p.last)
		}
		if since < p.every {
			return
		}
		fmt.Fprintln(p.w, p.line(elapsed, false))
	}
	p.shown, p.last = true, now
}

// fitted is the terminal's line after elapsed, narrower than its width
// (a line that wraps cannot be redrawn in place): without the bar when
// that is too wide, cut when that is too.
func (p *progress) fitted(elapsed time.Duration) string {
	s := p.line(elapsed, true)
	if p.width <= 0 || utf8.RuneCountInString(s) < p.width {
		return s
	}
	s = p.line(elapsed, false)
	if r := []rune(s); len(r) >= p.width {
		s = string(r[:max(p.width-1, 0)])
	}
	return s
}

// line is the progress line after elapsed, without line ending; bar draws
// the bar (on a terminal, when the total is known).
func (p *progress) line(elapsed time.Duration, bar bool) string {
	var b strings.Builder
	b.WriteString(p.label)
	if p.tty {
		b.WriteString(" ")
		if p.total > 0 && bar {
			fill := min(p.done*barWidth/p.total, barWidth)
			b.WriteString("[" + strings.Repeat("=", fill) + strings.Repeat(" ", barWidth-fill) + "] ")
		}
	} else {
		b.WriteString(": ")
	}
	switch {
	case p.total > 0:
		fmt.Fprintf(&b, "%d/%d %s (%d%%)", p.done, p.total, p.unit, min(p.done*100/p.total, 100))
	case p.done > 0:
		fmt.Fprintf(&b, "%d %s", p.done, p.unit)
	}
	if p.done > 0 && elapsed >= rateAfter {
		fmt.Fprintf(&b, ", %s %s/s", fmtRate(p.done, elapsed), p.unit)
	}
	if p.total > 0 || p.done > 0 {
		b.WriteString(", ")
	}
	b.WriteString(fmtElapsed(elapsed))
	return b.String()
}

// fmtRate is n per second over elapsed, whole.
func fmtRate(n int, elapsed time.Duration) string {
	return strconv.FormatInt(int64(float64(n)/elapsed.Seconds()+0.5), 10)
}

// fmtElapsed writes a duration to the tenth of a second below a minute,
// to the second above.
func fmtElapsed(d time.Duration) string {
	if d < time.Minute {
		return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s"
	}
	return d.Round(time.Second).String()
}
