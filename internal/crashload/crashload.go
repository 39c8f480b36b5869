//go:build unix

// Package crashload is the workload and the judge of the crash tests
// (TestBoltCrashConsistency in the root package, the power-cut tests in
// powercut): a child process writes random transactions to a store until
// it is killed, and the parent checks, after each kill, that every
// transaction the child saw acknowledged is there, and that every other
// transaction is there entirely or not at all.
//
// The child keeps two logs, one JSON line per transaction, each line
// describing the transaction's whole effect (the post-state of every name
// it touches, or "gone"). They must live where the test does not destroy
// data (outside a lossy filesystem):
//
//   - IntentsLog gets the line before the transaction begins. It needs no
//     fsync: a killed process's writes stay in the page cache, and the
//     parent reads them on the same kernel. It tells the parent every
//     transaction that may have reached the store.
//   - AckedLog gets the line, fsynced, after Commit (or WithTransaction)
//     returned nil. These are the acknowledged transactions.
//
// Every transaction writes the label tx=<its id> on each snapshot it leaves
// behind, so that its post-state differs from its pre-state on every name it
// touches (a removal leaves the name gone): whether it was applied is
// decidable name by name, and a half-applied transaction shows.
//
// A writer reserves every name its transaction touches or relies on (a
// parent) until its acknowledgement is logged, so transactions in flight at
// the same time touch disjoint names: the order of AckedLog is the commit
// order wherever it matters, and the state before an unacknowledged
// transaction is the state after the acknowledged ones.
//
// After each kill the parent replays the new acknowledged lines over its
// model (the state it verified after the previous kill) and demands, name by
// name, that the store equals the model, except for names touched by a
// transaction that was in flight: each such transaction must be visible
// entirely (all its names at its post-state) or not at all (all at the
// model's state). Transactions that fail on purpose (a callback error, a
// Rollback) must never be visible (Verify). The verified state becomes the
// model for the next cycle, where a new child reopens the store, learns its
// state by walking it, and goes on.
package crashload

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

const (
	// Ready is what the child prints once its store is open and its
	// state learned, just before it starts writing.
	Ready = "SNAPMETA-CRASH-CHILD-READY"

	// A child is killed between MinRun and MaxRun after it is ready.
	MinRun = 20 * time.Millisecond
	MaxRun = 300 * time.Millisecond
	// ChildLimit stops a child that nobody killed (its parent died).
	ChildLimit = 20 * time.Second

	// Writers in the child: the first groupWriters use WithTransaction
	// (and so share group commits), the others TransactionContext and
	// Commit.
	writers      = 6
	groupWriters = 4
	// target is about how many snapshots the workload keeps.
	target = 150

	// The logs' names, in the directory given to Write.
	IntentsLog = "intents.log"
	AckedLog   = "acked.log"
)

// State is one snapshot as the test knows it; nil means no snapshot of
// that name.
type State struct {
	Kind   string            `json:"kind"`
	Parent string            `json:"parent,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
	// ID is empty in an intent for a snapshot the transaction creates: it
	// is only known once the transaction ran.
	ID   string `json:"id,omitempty"`
	Size int64  `json:"size,omitempty"` // usage, of a committed snapshot
}

// Tx is one line of intents.log or acked.log.
type Tx struct {
	ID string `json:"tx"`
	// Via is "WithTransaction" or "Commit" (TransactionContext, then
	// Commit or Rollback).
	Via string `json:"via"`
	// Abort marks a transaction that fails on purpose after its writes: a
	// callback error or a Rollback. It must never be visible.
	Abort bool     `json:"abort,omitempty"`
	Ops   []string `json:"ops"`
	// Effects is the post-state of every name the transaction touches;
	// null: gone.
	Effects map[string]*State `json:"effects"`
}

func kindName(k snapshots.Kind) string { return k.String() }

var (
	kindActive    = kindName(snapshots.KindActive)
	kindCommitted = kindName(snapshots.KindCommitted)
)

// same reports whether the store's state got matches the expected
// state want; an expected ID left empty matches any.
func same(got, want *State) bool {
	if got == nil || want == nil {
		return got == nil && want == nil
	}
	return got.Kind == want.Kind && got.Parent == want.Parent && got.Size == want.Size &&
		(want.ID == "" || got.ID == want.ID) &&
		maps.Equal(got.Labels, want.Labels) // nil and empty are equal
}

func (s *State) String() string {
	if s == nil {
		return "gone"
	}
	b, _ := json.Marshal(s)
	return string(b)
}

// Read returns every snapshot of ms, in one read-only transaction.
func Read(ctx context.Context, ms storage.MetaStore) (map[string]*State, error) {
	out := map[string]*State{}
	err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		if err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			out[info.Name] = &State{Kind: kindName(info.Kind), Parent: info.Parent, Labels: info.Labels}
			return nil
		}); err != nil {
			return err
		}
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		for id, name := range ids {
			st := out[name]
			if st == nil {
				return fmt.Errorf("IDMap names %q (ID %s), which WalkInfo did not show", name, id)
			}
			st.ID = id
		}
		for name, st := range out {
			if st.ID == "" {
				return fmt.Errorf("IDMap has no ID for %q", name)
			}
			_, _, usage, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			st.Size = usage.Size
		}
		return nil
	})
	return out, err
}

// ---------------------------------------------------------------------------
// The child.

// Write is the child's work: on ms (already open), it learns the store's
// state, prints Ready, and writes random transactions from several writers
// until it is killed, logging them in logDir. cycle keeps names and
// transaction IDs unique across cycles; seed drives the choices. It returns
// only if nobody killed it within ChildLimit, or on a failure (reported on
// t, and printed with the prefix "crash child" that RunChild looks for).
func Write(t *testing.T, ms storage.MetaStore, logDir string, cycle int, seed uint64) {
	WriteTolerating(t, ms, logDir, cycle, seed, nil)
}

// WriteTolerating is Write for a store whose commits may fail without the
// writer being wrong, such as an etcd cluster losing a member: a
// transaction whose error satisfies uncertain is neither acknowledged nor
// released. Its outcome is unknown (a commit request lost with its
// connection may still have been applied), so its names stay reserved for
// the rest of the child's life: for Verify it is simply in flight, visible
// entirely or not at all. The writer goes on with other names.
func WriteTolerating(t *testing.T, ms storage.MetaStore, logDir string, cycle int, seed uint64, uncertain func(error) bool) {
	snaps, err := Read(context.Background(), ms)
	require.NoError(t, err, "learning the state of the store")

	openLog := func(name string) *os.File {
		f, err := os.OpenFile(filepath.Join(logDir, name), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		require.NoError(t, err)
		t.Cleanup(func() { _ = f.Close() })
		return f
	}
	w := &world{
		t:         t,
		ms:        ms,
		cycle:     cycle,
		intents:   openLog(IntentsLog),
		acked:     openLog(AckedLog),
		stop:      make(chan struct{}),
		snaps:     snaps,
		reserved:  map[string]bool{},
		uncertain: uncertain,
	}
	limit := time.AfterFunc(ChildLimit, w.halt)
	defer limit.Stop()

	fmt.Println(Ready)
	var wg sync.WaitGroup
	for i := range writers {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		wg.Go(func() { w.write(rng, i < groupWriters) })
	}
	wg.Wait()
	t.Logf("not killed within %v: stopped after %d acknowledged transactions (%d of unknown outcome)", ChildLimit, w.acks.Load(), w.unknown.Load())
}

// world is the child's knowledge of the store and its writers'
// reservations.
type world struct {
	t              *testing.T
	ms             storage.MetaStore
	cycle          int
	intents, acked *os.File

	stop     chan struct{}
	stopOnce sync.Once
	seq      atomic.Int64 // numbers transactions and new names
	acks     atomic.Int64 // acknowledged transactions
	unknown  atomic.Int64 // transactions that failed as uncertain allows

	uncertain func(error) bool // see WriteTolerating; nil: no error is expected

	mu sync.Mutex
	// snaps is the state after every acknowledged transaction; its values
	// are never changed once stored, only replaced.
	snaps    map[string]*State
	reserved map[string]bool // names some transaction in flight uses
}

func (w *world) halt() { w.stopOnce.Do(func() { close(w.stop) }) }

func (w *world) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

func (w *world) fail(err error) {
	w.t.Errorf("crash child, cycle %d: %v", w.cycle, err)
	w.halt()
}

// write runs transactions until the child is stopped (or killed).
func (w *world) write(rng *rand.Rand, group bool) {
	for !w.stopped() {
		p := w.plan(rng, group)
		if err := appendTx(w.intents, &p.tx, false); err != nil {
			w.fail(fmt.Errorf("writing intent: %w", err))
			return
		}
		if err := p.execute(w.ms); err != nil {
			if w.uncertain != nil && w.uncertain(err) {
				// Keep the names reserved: see WriteTolerating.
				w.unknown.Add(1)
				continue
			}
			w.fail(fmt.Errorf("transaction %s via %s %q: %w", p.tx.ID, p.tx.Via, p.tx.Ops, err))
			return
		}
		if !p.tx.Abort {
			if err := appendTx(w.acked, &p.tx, true); err != nil {
				w.fail(fmt.Errorf("writing acknowledgement: %w", err))
				return
			}
			w.acks.Add(1)
		}
		w.finish(p)
	}
}

// appendTx writes tx as one line, in one write (O_APPEND keeps
// concurrent lines whole), and fsyncs if asked.
func appendTx(f *os.File, tx *Tx, sync bool) error {
	line, err := json.Marshal(tx)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		return err
	}
	if sync {
		return f.Sync()
	}
	return nil
}

// finish publishes an acknowledged transaction's effect and releases its
// names.
func (w *world) finish(p *txPlan) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !p.tx.Abort {
		for name, st := range p.tx.Effects {
			if st == nil {
				delete(w.snaps, name)
			} else {
				w.snaps[name] = st
			}
		}
	}
	for name := range p.uses {
		delete(w.reserved, name)
	}
}

// txOp is one operation of a planned transaction.
type txOp struct {
	do     string // "create", "commit", "remove", "label"
	kind   snapshots.Kind
	key    string // the active to commit
	name   string // the snapshot created, committed, removed or labelled
	parent string // of a create; the rebase target of a commit
	// base is the state the operation starts from: the parent of a create,
	// the active of a commit, the snapshot removed or labelled; its ID may
	// only be known once an earlier operation of the transaction ran.
	base   *State
	labels map[string]string
	paths  []string
	usage  snapshots.Usage
	want   *State // the post-state of name
}

// txPlan is a transaction decided before it runs.
type txPlan struct {
	tx  Tx
	ops []txOp
	// local is the transaction's view over the world: its own post-states
	// (nil: gone).
	local map[string]*State
	uses  map[string]bool // names reserved: touched or relied on
}

func (p *txPlan) describe(format string, args ...any) {
	p.tx.Ops = append(p.tx.Ops, fmt.Sprintf(format, args...))
}

// plan decides a transaction of one to four operations on names no other
// transaction in flight uses, and reserves them.
func (w *world) plan(rng *rand.Rand, group bool) *txPlan {
	w.mu.Lock()
	defer w.mu.Unlock()
	p := &txPlan{
		tx:    Tx{ID: fmt.Sprintf("%d.%d", w.cycle, w.seq.Add(1)), Via: "Commit", Effects: map[string]*State{}},
		local: map[string]*State{},
		uses:  map[string]bool{},
	}
	if group {
		p.tx.Via = "WithTransaction"
	}
	p.tx.Abort = rng.IntN(20) == 0
	n := 1
	if rng.IntN(2) == 0 {
		n = 2 + rng.IntN(3)
	}
	for range n {
		w.planOp(rng, p)
	}
	for name := range p.uses {
		w.reserved[name] = true
	}
	for name, st := range p.local {
		p.tx.Effects[name] = st
	}
	return p
}

// get returns the state of name as the transaction sees it.
func (w *world) get(p *txPlan, name string) *State {
	if st, ok := p.local[name]; ok {
		return st
	}
	return w.snaps[name]
}

// candidates returns, sorted, the names the transaction may use that
// satisfy ok.
func (w *world) candidates(p *txPlan, ok func(name string, st *State) bool) []string {
	var out []string
	for name := range w.snaps {
		if _, mine := p.local[name]; !mine && !w.reserved[name] && ok(name, w.snaps[name]) {
			out = append(out, name)
		}
	}
	for name, st := range p.local {
		if st != nil && ok(name, st) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

func pick(rng *rand.Rand, names []string) string { return names[rng.IntN(len(names))] }

func (w *world) newName(prefix string) string {
	return fmt.Sprintf("%s-%d.%d", prefix, w.cycle, w.seq.Add(1))
}

func (w *world) planOp(rng *rand.Rand, p *txPlan) {
	children := map[string]int{}
	for _, m := range []map[string]*State{w.snaps, p.local} {
		for name, st := range m {
			if cur := w.get(p, name); st != nil && cur == st && st.Parent != "" {
				children[st.Parent]++
			}
		}
	}
	committed := w.candidates(p, func(_ string, st *State) bool { return st.Kind == kindCommitted })
	actives := w.candidates(p, func(_ string, st *State) bool { return st.Kind == kindActive })
	leaves := w.candidates(p, func(name string, _ *State) bool { return children[name] == 0 })
	existing := w.candidates(p, func(string, *State) bool { return true })

	removeWeight := 15
	if len(existing) > target {
		removeWeight = 60
	}
	weights := []struct {
		do string
		w  int
	}{
		{"create", 35},
		{"commit", 20 * min(len(actives), 1)},
		{"remove", removeWeight * min(len(leaves), 1)},
		{"label", 15 * min(len(existing), 1)},
	}
	total := 0
	for _, x := range weights {
		total += x.w
	}
	r := rng.IntN(total)
	do := "create"
	for _, x := range weights {
		if r < x.w {
			do = x.do
			break
		}
		r -= x.w
	}

	txLabels := func() map[string]string {
		l := map[string]string{"tx": p.tx.ID}
		if rng.IntN(2) == 0 {
			l[fmt.Sprintf("k%d", rng.IntN(3))] = strconv.Itoa(rng.IntN(1000))
		}
		return l
	}
	op := txOp{do: do}
	switch do {
	case "create":
		op.kind = snapshots.KindActive
		if rng.IntN(4) == 0 {
			op.kind = snapshots.KindView
		}
		op.name = w.newName(map[snapshots.Kind]string{snapshots.KindActive: "a", snapshots.KindView: "v"}[op.kind])
		if len(committed) > 0 && rng.IntN(5) != 0 {
			op.parent = pick(rng, committed)
			op.base = w.get(p, op.parent)
			p.uses[op.parent] = true
		}
		op.labels = txLabels()
		op.want = &State{Kind: kindName(op.kind), Parent: op.parent, Labels: op.labels}
		p.describe("create %s %q on %q", op.want.Kind, op.name, op.parent)
	case "commit":
		op.key = pick(rng, actives)
		op.base = w.get(p, op.key)
		op.name = w.newName("c")
		op.labels = txLabels()
		op.usage = snapshots.Usage{Size: 1 + rng.Int64N(1<<20), Inodes: 1 + rng.Int64N(100)}
		parent := op.base.Parent
		if parent == "" && len(committed) > 0 && rng.IntN(2) == 0 {
			op.parent = pick(rng, committed) // rebase on commit
			parent = op.parent
			p.uses[op.parent] = true
		}
		op.want = &State{Kind: kindCommitted, Parent: parent, Labels: op.labels, ID: op.base.ID, Size: op.usage.Size}
		p.local[op.key] = nil
		p.uses[op.key] = true
		p.describe("commit %q as %q onto %q", op.key, op.name, parent)
	case "remove":
		op.name = pick(rng, leaves)
		op.base = w.get(p, op.name)
		p.describe("remove %q", op.name)
	case "label":
		op.name = pick(rng, existing)
		op.base = w.get(p, op.name)
		k := fmt.Sprintf("k%d", rng.IntN(3))
		var labels map[string]string
		switch rng.IntN(3) {
		case 0: // one field: set or remove k
			v := ""
			if rng.IntN(3) != 0 {
				v = strconv.Itoa(rng.IntN(1000))
			}
			op.labels = map[string]string{"tx": p.tx.ID, k: v}
			op.paths = []string{"labels.tx", "labels." + k}
			labels = maps.Clone(op.base.Labels)
			if labels == nil {
				labels = map[string]string{}
			}
			labels["tx"] = p.tx.ID
			if v == "" {
				delete(labels, k)
			} else {
				labels[k] = v
			}
		case 1: // "labels": replace them all
			op.labels = map[string]string{"tx": p.tx.ID, k: "all"}
			op.paths = []string{"labels"}
			labels = maps.Clone(op.labels)
		default: // no field path: replace them all
			op.labels = map[string]string{"tx": p.tx.ID}
			labels = maps.Clone(op.labels)
		}
		want := *op.base
		want.Labels = labels
		op.want = &want
		p.describe("label %q %v paths %q", op.name, op.labels, op.paths)
	}
	p.uses[op.name] = true
	p.local[op.name] = op.want
	p.ops = append(p.ops, op)
}

// errAbort is how a transaction fails on purpose.
var errAbort = errors.New("the transaction fails on purpose")

// execute runs the planned transaction and reports any unexpected outcome.
func (p *txPlan) execute(ms storage.MetaStore) error {
	ctx := context.Background()
	if p.tx.Via == "WithTransaction" {
		err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			if err := p.run(ctx); err != nil {
				return err
			}
			if p.tx.Abort {
				return errAbort
			}
			return nil
		})
		if p.tx.Abort && errors.Is(err, errAbort) {
			return nil
		}
		return err
	}
	tctx, tr, err := ms.TransactionContext(ctx, true)
	if err != nil {
		return err
	}
	if err := p.run(tctx); err != nil {
		return errors.Join(err, tr.Rollback())
	}
	if p.tx.Abort {
		return tr.Rollback()
	}
	return tr.Commit()
}

// run performs the operations in a transaction, checking each answer and
// filling in the IDs learned.
func (p *txPlan) run(ctx context.Context) error {
	for i, op := range p.ops {
		if err := op.run(ctx); err != nil {
			return fmt.Errorf("%s: %w", p.tx.Ops[i], err)
		}
	}
	return nil
}

func withParent(parent string) snapshots.Opt {
	return func(info *snapshots.Info) error {
		info.Parent = parent
		return nil
	}
}

func (op *txOp) run(ctx context.Context) error {
	switch op.do {
	case "create":
		s, err := storage.CreateSnapshot(ctx, op.kind, op.name, op.parent, snapshots.WithLabels(op.labels))
		if err != nil {
			return err
		}
		if op.base != nil && (len(s.ParentIDs) == 0 || s.ParentIDs[0] != op.base.ID) {
			return fmt.Errorf("parent IDs %v, want %s first", s.ParentIDs, op.base.ID)
		}
		op.want.ID = s.ID
	case "commit":
		opts := []snapshots.Opt{snapshots.WithLabels(op.labels)}
		if op.parent != "" {
			opts = append(opts, withParent(op.parent))
		}
		id, err := storage.CommitActive(ctx, op.key, op.name, op.usage, opts...)
		if err != nil {
			return err
		}
		if id != op.base.ID {
			return fmt.Errorf("committed with ID %s, the active had %s", id, op.base.ID)
		}
		op.want.ID = id
	case "remove":
		id, kind, err := storage.Remove(ctx, op.name)
		if err != nil {
			return err
		}
		if id != op.base.ID || kindName(kind) != op.base.Kind {
			return fmt.Errorf("removed %s ID %s, want %s ID %s", kind, id, op.base.Kind, op.base.ID)
		}
	case "label":
		info, err := storage.UpdateInfo(ctx, snapshots.Info{Name: op.name, Labels: op.labels}, op.paths...)
		if err != nil {
			return err
		}
		if !maps.Equal(info.Labels, op.want.Labels) {
			return fmt.Errorf("labels became %v, want %v", info.Labels, op.want.Labels)
		}
		op.want.ID = op.base.ID
	}
	return nil
}

// ---------------------------------------------------------------------------
// The parent.

// Stats sums up what the cycles saw.
type Stats struct {
	Acked, Aborted int // acknowledged; failed on purpose
	Extra, Lost    int // in flight at the kill: visible entirely; not at all
	Torn           int // log lines cut by the kill
	MaxSnaps       int
	// Time spent starting children, letting them write, and verifying.
	Startup, Running, Verifying time.Duration
}

// Keep copies the database and the logs out of the test's temporary
// directory, which is removed when the test ends, and returns where.
func Keep(t *testing.T, dir string) string {
	keep, err := os.MkdirTemp("", "snapmeta-crash-")
	if err == nil {
		err = os.CopyFS(keep, os.DirFS(dir))
	}
	if err != nil {
		t.Logf("keeping the failed cycle's files: %v", err)
		return dir + " (removed at the end of the test)"
	}
	return keep
}

// output collects the child's output and notices its ready line.
type output struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	once  sync.Once
	ready chan struct{}
}

func (o *output) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(b)
	if bytes.Contains(o.buf.Bytes(), []byte(Ready+"\n")) {
		o.once.Do(func() { close(o.ready) })
	}
	return len(b), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// RunChild re-executes the test binary running only the test named test
// (the child, which calls Write) with env added to the environment, lets
// it write for runFor once it is ready, and kills it with SIGKILL. The
// child must not end any other way, nor report a failure or a race.
func RunChild(t *testing.T, test string, env []string, cycle int, runFor time.Duration, stats *Stats) {
	t.Helper()
	c := StartChild(t, test, env, cycle, stats)
	select {
	case err := <-c.exited:
		t.Fatalf("cycle %d: the child ended (%v) before it was killed:\n%s", cycle, err, c.out)
	case <-time.After(runFor):
	}
	c.Kill(t)
}

// Child is a child process started by StartChild.
type Child struct {
	cmd            *exec.Cmd
	out            *output
	exited         chan error
	cycle          int
	started, ready time.Time
	stats          *Stats
	killed         bool
}

// StartChild re-executes the test binary running only the test named test
// with env added to the environment, and returns once the child has
// printed Ready. The caller must call Kill. It is RunChild's first half,
// for tests that do something else while the child writes.
func StartChild(t *testing.T, test string, env []string, cycle int, stats *Stats) *Child {
	t.Helper()
	c := LaunchChild(t, test, env, cycle, stats)
	c.WaitReady(t)
	return c
}

// LaunchChild is StartChild without the wait: call WaitReady before using
// the child, which lets several children start at once.
func LaunchChild(t *testing.T, test string, env []string, cycle int, stats *Stats) *Child {
	t.Helper()
	c := &Child{out: &output{ready: make(chan struct{})}, exited: make(chan error, 1), cycle: cycle, stats: stats}
	c.cmd = exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	c.cmd.Env = append(os.Environ(), env...)
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	c.started = time.Now()
	require.NoError(t, c.cmd.Start())
	go func() { c.exited <- c.cmd.Wait() }()
	return c
}

// WaitReady waits until the child has printed Ready, and fails t if it
// ends first or is not ready within a minute. Once ready, it returns at
// once.
func (c *Child) WaitReady(t *testing.T) {
	t.Helper()
	if !c.ready.IsZero() {
		return
	}
	select {
	case <-c.out.ready:
	case err := <-c.exited:
		c.killed = true // nothing left to kill
		t.Fatalf("cycle %d: the child ended (%v) before it was ready:\n%s", c.cycle, err, c.out)
	case <-time.After(time.Minute):
		c.kill()
		t.Fatalf("cycle %d: the child was not ready within a minute:\n%s", c.cycle, c.out)
	}
	c.ready = time.Now()
	c.stats.Startup += c.ready.Sub(c.started)
}

func (c *Child) kill() {
	if !c.killed {
		c.killed = true
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
}

// Kill kills the child with SIGKILL and fails t if it had ended any other
// way, or reported a failure or a race. Kill may be called more than once.
func (c *Child) Kill(t *testing.T) {
	t.Helper()
	if c.killed {
		return
	}
	c.kill()
	c.stats.Running += time.Since(c.ready)
	ws, ok := c.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("cycle %d: the child ended with %v, not by SIGKILL:\n%s", c.cycle, c.cmd.ProcessState, c.out)
	}
	for _, bad := range []string{"WARNING: DATA RACE", "--- FAIL", "panic:", "crash child"} {
		if strings.Contains(c.out.String(), bad) {
			t.Fatalf("cycle %d: the child reported %q:\n%s", c.cycle, bad, c.out)
		}
	}
}

// Signal sends sig to the child, for a child that stops gracefully on it;
// Kill must still follow.
func (c *Child) Signal(sig os.Signal) error { return c.cmd.Process.Signal(sig) }

// Output returns what the child printed so far.
func (c *Child) Output() string { return c.out.String() }

// ReadLog returns the transactions of the whole lines appended to path
// since the last call, and cuts off a last line the kill left unfinished
// (returning 1 for it) so that the next child appends after whole lines.
func ReadLog(t *testing.T, path string, offsets map[string]int64) ([]Tx, int) {
	t.Helper()
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0
	}
	require.NoError(t, err)
	defer f.Close()
	off := offsets[path]
	_, err = f.Seek(off, io.SeekStart)
	require.NoError(t, err)
	data, err := io.ReadAll(f)
	require.NoError(t, err)
	end := bytes.LastIndexByte(data, '\n') + 1
	torn := 0
	if end < len(data) {
		torn = 1
		require.NoError(t, os.Truncate(path, off+int64(end)))
	}
	offsets[path] = off + int64(end)
	var txs []Tx
	for line := range bytes.Lines(data[:end]) {
		var tx Tx
		require.NoError(t, json.Unmarshal(line, &tx), "%s: %s", path, line)
		txs = append(txs, tx)
	}
	return txs, torn
}

// Verdict is what Verify found wrong; empty, all is well.
type Verdict struct {
	// Problems describes each, one line or paragraph each.
	Problems []string
	// Lost counts names outside the transactions in flight whose state is
	// not what the acknowledged transactions left: acknowledged commits
	// lost (or changed behind the writer's back).
	Lost int
}

// OK reports whether no problem was found.
func (v Verdict) OK() bool { return len(v.Problems) == 0 }

// Verify checks the store's state after a kill against the model (the
// state verified after the previous kill), the acknowledged transactions
// and the intents of the cycle (everAborted collects, over the cycles, the
// transactions that failed on purpose), and says what is wrong.
func Verify(cycle int, model map[string]*State, intents, acks []Tx, state map[string]*State, everAborted map[string]bool, stats *Stats) Verdict {
	var v Verdict
	errorf := func(format string, args ...any) {
		v.Problems = append(v.Problems, fmt.Sprintf("cycle %d: "+format, append([]any{cycle}, args...)...))
	}

	// The model after every acknowledged transaction, in order.
	expected := maps.Clone(model)
	acked := map[string]bool{}
	for _, a := range acks {
		acked[a.ID] = true
		for name, st := range a.Effects {
			if st == nil {
				delete(expected, name)
			} else {
				expected[name] = st
			}
		}
	}
	stats.Acked += len(acks)

	// Each transaction in flight at the kill is visible entirely or not at
	// all; no two of them touch one name.
	intended := map[string]bool{}
	visible := map[string]bool{} // tx IDs whose effect is in the store
	for id := range acked {
		visible[id] = true
	}
	inFlight := map[string]string{} // name -> tx
	for _, in := range intents {
		intended[in.ID] = true
		switch {
		case acked[in.ID]:
			continue
		case in.Abort:
			everAborted[in.ID] = true
			stats.Aborted++
			continue
		}
		all, none := true, true
		var diff []string
		for _, name := range slices.Sorted(maps.Keys(in.Effects)) {
			post := in.Effects[name]
			if other, dup := inFlight[name]; dup {
				errorf("test bug: transactions %s and %s were in flight together on %q", other, in.ID, name)
			}
			inFlight[name] = in.ID
			got, pre := state[name], expected[name]
			all = all && same(got, post)
			none = none && same(got, pre)
			diff = append(diff, fmt.Sprintf("\t%q: before %v, after %v, store has %v", name, pre, post, got))
		}
		switch {
		case none:
			stats.Lost++
		case all:
			stats.Extra++
			visible[in.ID] = true
		default:
			errorf("transaction %s (%s, unacknowledged, %q) is visible in part:\n%s", in.ID, in.Via, in.Ops, strings.Join(diff, "\n"))
		}
	}
	for _, a := range acks {
		if !intended[a.ID] {
			errorf("test bug: transaction %s acknowledged without an intent", a.ID)
		}
	}

	// Every other name is as the acknowledged transactions left it.
	for _, name := range slices.Sorted(maps.Keys(union(state, expected))) {
		if _, flying := inFlight[name]; flying {
			continue
		}
		if got, want := state[name], expected[name]; !same(got, want) {
			v.Lost++
			errorf("%q: store has %v, acknowledged transactions left %v (last touched by %s)", name, got, want, lastTouch(acks, name))
		}
	}

	// No snapshot carries the label of a transaction that failed, or that
	// is not visible.
	for _, name := range slices.Sorted(maps.Keys(state)) {
		tx := state[name].Labels["tx"]
		switch {
		case everAborted[tx]:
			errorf("%q carries the label of transaction %s, which failed on purpose", name, tx)
		case strings.HasPrefix(tx, strconv.Itoa(cycle)+".") && !visible[tx]:
			errorf("%q carries the label of transaction %s, which is not visible", name, tx)
		}
	}
	return v
}

func union(a, b map[string]*State) map[string]bool {
	out := map[string]bool{}
	for name := range a {
		out[name] = true
	}
	for name := range b {
		out[name] = true
	}
	return out
}

// lastTouch names the last acknowledged transaction of acks that
// touched name, for error messages.
func lastTouch(acks []Tx, name string) string {
	for i := len(acks) - 1; i >= 0; i-- {
		if _, ok := acks[i].Effects[name]; ok {
			return fmt.Sprintf("acknowledged transaction %s %q", acks[i].ID, acks[i].Ops)
		}
	}
	return "no acknowledged transaction of this cycle"
}
