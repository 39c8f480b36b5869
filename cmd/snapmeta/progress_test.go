package main

import (
	"bytes"
	"context"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeClock is a clock the test moves.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)} }

// TestProgressNotATerminal: lines at most once per interval, the first
// after one interval, the rate only after a second, and a summary.
func TestProgressNotATerminal(t *testing.T) {
	clk := newFakeClock()
	var out bytes.Buffer
	p := newProgress(&out, false, 5*time.Second, clk.now, "export: reading", "snapshots", 0)
	p.add(1000) // at once: nothing yet
	clk.advance(4 * time.Second)
	p.add(1000)
	assert.Empty(t, out.String(), "nothing before the first interval")
	clk.advance(time.Second)
	p.add(500)
	clk.advance(time.Second)
	p.add(500) // one second after the first line: too soon
	clk.advance(4 * time.Second)
	p.tick()
	p.finish(true)
	assert.Equal(t, "export: reading: 2500 snapshots, 500 snapshots/s, 5.0s\n"+
		"export: reading: 3000 snapshots, 300 snapshots/s, 10.0s\n"+
		"export: reading: done, 3000 snapshots in 10.0s (300 snapshots/s)\n", out.String())
}

// TestProgressShortPhaseIsSilent: a phase that ends before its first line
// is due writes nothing at all, on a terminal or not.
func TestProgressShortPhaseIsSilent(t *testing.T) {
	for _, tty := range []bool{false, true} {
		clk := newFakeClock()
		var out bytes.Buffer
		p := newProgress(&out, tty, 5*time.Second, clk.now, "check: counting", "snapshots", 0)
		p.add(6481669)
		clk.advance(400 * time.Millisecond)
		p.add(1)
		p.finish(true)
		assert.Empty(t, out.String(), "tty %v", tty)
	}
}

// TestProgressTerminal: the line is redrawn in place with a bar and a
// percentage, at most every ttyRedraw, without a rate before a second has
// passed; the summary replaces it and ends the line.
func TestProgressTerminal(t *testing.T) {
	clk := newFakeClock()
	var out bytes.Buffer
	p := newProgress(&out, true, 5*time.Second, clk.now, "migrate: copying", "snapshots", 200)
	p.add(10)
	clk.advance(600 * time.Millisecond)
	p.add(40)
	clk.advance(50 * time.Millisecond)
	p.add(10) // within ttyRedraw of the last draw: not drawn
	clk.advance(350 * time.Millisecond)
	p.add(40)
	p.finish(false)
	got := out.String()
	require.NotContains(t, got[:len(got)-1], "\n", "a terminal's line is redrawn, not repeated")
	draws := strings.Split(got, "\r")[1:]
	require.Len(t, draws, 3)
	assert.Equal(t, "migrate: copying [=====               ] 50/200 snapshots (25%), 0.6s\x1b[K", draws[0])
	assert.Equal(t, "migrate: copying [==========          ] 100/200 snapshots (50%), 100 snapshots/s, 1.0s\x1b[K", draws[1])
	assert.Equal(t, "migrate: copying: stopped, 100 snapshots in 1.0s (100 snapshots/s)\x1b[K\n", draws[2])
}

// TestProgressNil: a nil progress (--no-progress) does nothing.
func TestProgressNil(t *testing.T) {
	var p *progress
	p.add(1)
	p.tick()
	p.finish(true)
}

// TestProgressOpaquePhase: a phase with no count shows its elapsed time.
func TestProgressOpaquePhase(t *testing.T) {
	clk := newFakeClock()
	var out bytes.Buffer
	p := newProgress(&out, false, time.Second, clk.now, "check: checking invariants", "snapshots", 0)
	clk.advance(2 * time.Second)
	p.tick()
	p.finish(true)
	assert.Equal(t, "check: checking invariants: 2.0s\ncheck: checking invariants: done in 2.0s\n", out.String())
}

// TestProgressOnStderrOnly runs the long commands with a progress interval
// short enough for lines to appear: stderr has progress lines and a
// summary per phase, stdout is what it is without progress, and
// --no-progress (or its variable) silences stderr.
func TestProgressOnStderrOnly(t *testing.T) {
	path := boltFixture(t)
	export := ok(t, "export", "--store", path)
	check := ok(t, "check", "--store", path)
	target := "bolt://" + t.TempDir() + "/copy.db"
	for _, tc := range []struct {
		name   string
		args   []string
		stdin  string
		stdout string   // "" when not compared
		phases []string // labels whose summary must appear
	}{
		{"export", []string{"export", "--store", path}, "", export, []string{"export: reading"}},
		{"check", []string{"check", "--store", path}, "", check, []string{"check: counting"}},
		{"import", []string{"import", "--store", t.TempDir() + "/imported.db"}, export, "imported 7 snapshots, skipped 0 identical\n", []string{"import: writing"}},
		{"migrate", []string{"migrate", "--from", path, "--to", target}, "", "", []string{
			"migrate: reading the source",
			"migrate: copying", "migrate: verifying the source", "migrate: verifying the target"}},
		{"salvage", []string{"salvage", "--from", path, "--to", t.TempDir() + "/salvaged.db"}, "", "", []string{"salvage: copying"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := snapmeta(t, tc.stdin, nil, append(tc.args, "--progress-interval", "1ns")...)
			require.Equal(t, 0, r.code, r.stderr)
			if tc.stdout != "" {
				assert.Equal(t, tc.stdout, r.stdout, "stdout is the same with progress")
			}
			assert.NotContains(t, r.stdout, ": done")
			for _, ph := range tc.phases {
				assert.Regexp(t, `(?m)^`+regexp.QuoteMeta(ph)+`: done(, \d+ snapshots)? in \d+\.\ds`, r.stderr)
			}
			assert.NotContains(t, r.stderr, "\r", "not a terminal: no redraws")
			if tc.name == "export" {
				assert.Contains(t, r.stderr, "export: reading: 1 snapshots, ")
				assert.Contains(t, r.stderr, "export: reading: 7 snapshots, ")
			}
		})
	}
	wantFail(t, exe(t, "export", "--store", path, "--progress-interval", "0s"), 2, "--progress-interval must be positive, not 0s")
	for _, silent := range []struct {
		args []string
		env  []string
	}{
		{[]string{"--no-progress"}, nil},
		{nil, []string{"SNAPMETA_NO_PROGRESS=1"}},
		{nil, nil}, // the default interval is longer than the run
	} {
		r := snapmeta(t, "", append(silent.env, "SNAPMETA_PROGRESS_INTERVAL=1ns"), append([]string{"export", "--store", path}, silent.args...)...)
		if silent.args == nil && silent.env == nil {
			r = exe(t, "export", "--store", path)
		}
		require.Equal(t, 0, r.code, r.stderr)
		assert.Empty(t, r.stderr, "%v %v", silent.args, silent.env)
		assert.Equal(t, export, r.stdout)
	}
}

// TestProgressOnATerminal runs export in-process with stderr taken for a
// terminal (and no delay before the first draw): the line is redrawn with
// carriage returns on stderr, and stdout is unchanged.
func TestProgressOnATerminal(t *testing.T) {
	path := boltFixture(t)
	var stdout, stderr bytes.Buffer
	oldTTY, oldDelay := isTerminal, ttyDelay
	isTerminal = func(w io.Writer) bool { return w == io.Writer(&stderr) }
	ttyDelay = 0
	t.Cleanup(func() { isTerminal, ttyDelay = oldTTY, oldDelay })
	code := run(context.Background(), []string{"export", "--store", path}, strings.NewReader(""), &stdout, &stderr)
	require.Equal(t, 0, code, stderr.String())
	assert.Equal(t, ok(t, "export", "--store", path), stdout.String())
	assert.Regexp(t, `^\rexport: reading 1 snapshots, 0\.0s\x1b\[K\rexport: reading: done, 7 snapshots in 0\.0s\x1b\[K\n$`, stderr.String())
}

// TestProgressFitsTheTerminal: a line that would wrap cannot be redrawn in
// place, so on a narrow terminal the bar goes first, then the end.
func TestProgressFitsTheTerminal(t *testing.T) {
	for _, tc := range []struct {
		width int
		want  string
	}{
		{0, "migrate: verifying the target [==========          ] 500/1000 snapshots (50%), 250 snapshots/s, 2.0s"},
		{80, "migrate: verifying the target 500/1000 snapshots (50%), 250 snapshots/s, 2.0s"},
		{40, "migrate: verifying the target 500/1000 "},
	} {
		clk := newFakeClock()
		var out bytes.Buffer
		p := newProgress(&out, true, time.Second, clk.now, "migrate: verifying the target", "snapshots", 1000)
		p.width = tc.width
		clk.advance(2 * time.Second)
		p.add(500)
		assert.Equal(t, "\r"+tc.want+"\x1b[K", out.String(), "width %d", tc.width)
		if tc.width > 0 {
			assert.Less(t, len([]rune(tc.want)), tc.width)
		}
	}
}
