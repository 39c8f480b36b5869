//go:build unix

package storage_test

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
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// Crash consistency of the bbolt engine, proved the way bbolt and etcd prove
// theirs: a child process (this test binary, re-executed) writes at random
// and is killed with SIGKILL at a random moment; the parent reopens the file
// and checks that every transaction the child saw acknowledged is there,
// and that every other transaction is there entirely or not at all.
//
// The child keeps two logs next to the database, one JSON line per
// transaction, each line describing the transaction's whole effect (the
// post-state of every name it touches, or "gone"):
//
//   - intents.log gets the line before the transaction begins. It needs no
//     fsync: a killed process's writes stay in the page cache, and the
//     parent reads them on the same kernel. It tells the parent every
//     transaction that may have reached the file.
//   - acked.log gets the line, fsynced, after Commit (or WithTransaction)
//     returned nil. These are the acknowledged transactions.
//
// Every transaction writes the label tx=<its id> on each snapshot it leaves
// behind, so that its post-state differs from its pre-state on every name it
// touches (a removal leaves the name gone): whether it was applied is
// decidable name by name, and a half-applied transaction shows.
//
// A writer reserves every name its transaction touches or relies on (a
// parent) until its acknowledgement is logged, so transactions in flight at
// the same time touch disjoint names: the order of acked.log is the commit
// order wherever it matters, and the state before an unacknowledged
// transaction is the state after the acknowledged ones.
//
// After each kill the parent replays the new acknowledged lines over its
// model (the state it verified after the previous kill) and demands, name by
// name, that the store equals the model, except for names touched by a
// transaction that was in flight: each such transaction must be visible
// entirely (all its names at its post-state) or not at all (all at the
// model's state). Transactions that fail on purpose (a callback error, a
// Rollback) must never be visible. storage.Check must find no problem. The
// verified state becomes the model for the next cycle, where a new child
// reopens the file, learns its state by walking it, and goes on.
//
// A SIGKILL does not lose the page cache, so this proves atomicity,
// acknowledgement only after the commit is written, and recovery of a file
// whose writer died at any point; it cannot tell a missing fsync from a
// present one (that takes a power cut, e.g. dm-flakey or LazyFS).

const (
	// crashChildEnv holds the directory of the database; set, it makes
	// TestBoltCrashChild run.
	crashChildEnv = "SNAPMETA_CRASH_CHILD"
	// crashCycleEnv and crashSeedEnv pass the cycle number (which keeps
	// names and transaction IDs unique across cycles) and a random seed.
	crashCycleEnv = "SNAPMETA_CRASH_CYCLE"
	crashSeedEnv  = "SNAPMETA_CRASH_SEED"
	// crashCyclesEnv overrides how many kills TestBoltCrashConsistency
	// does; SNAPMETA_CRASH_SEED, given to the parent, replays its choices
	// (not the kill timing, which the scheduler decides).
	crashCyclesEnv     = "SNAPMETA_CRASH_CYCLES"
	crashDefaultCycles = 50

	// crashReady is what the child prints once its store is open and its
	// state learned, just before it starts writing.
	crashReady = "SNAPMETA-CRASH-CHILD-READY"

	// The child is killed this long after it is ready.
	crashMinRun = 20 * time.Millisecond
	crashMaxRun = 300 * time.Millisecond
	// crashChildLimit stops a child that nobody killed (its parent died).
	crashChildLimit = 20 * time.Second

	// Writers in the child: the first crashGroupWriters use WithTransaction
	// (and so share group commits), the others TransactionContext and
	// Commit.
	crashWriters      = 6
	crashGroupWriters = 4
	// crashTarget is about how many snapshots the workload keeps.
	crashTarget = 150

	crashIntentsLog = "intents.log"
	crashAckedLog   = "acked.log"
	crashDBFile     = "metadata.db"
)

// crashState is one snapshot as the test knows it; nil means no snapshot of
// that name.
type crashState struct {
	Kind   string            `json:"kind"`
	Parent string            `json:"parent,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
	// ID is empty in an intent for a snapshot the transaction creates: it
	// is only known once the transaction ran.
	ID   string `json:"id,omitempty"`
	Size int64  `json:"size,omitempty"` // usage, of a committed snapshot
}

// crashTx is one line of intents.log or acked.log.
type crashTx struct {
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
	Effects map[string]*crashState `json:"effects"`
}

func crashKindName(k snapshots.Kind) string { return k.String() }

var (
	crashActive    = crashKindName(snapshots.KindActive)
	crashView      = crashKindName(snapshots.KindView)
	crashCommitted = crashKindName(snapshots.KindCommitted)
)

// crashSame reports whether the store's state got matches the expected
// state want; an expected ID left empty matches any.
func crashSame(got, want *crashState) bool {
	if got == nil || want == nil {
		return got == nil && want == nil
	}
	return got.Kind == want.Kind && got.Parent == want.Parent && got.Size == want.Size &&
		(want.ID == "" || got.ID == want.ID) &&
		maps.Equal(got.Labels, want.Labels) // nil and empty are equal
}

func (s *crashState) String() string {
	if s == nil {
		return "gone"
	}
	b, _ := json.Marshal(s)
	return string(b)
}

// crashRead returns every snapshot of ms, in one read-only transaction.
func crashRead(ctx context.Context, ms storage.MetaStore) (map[string]*crashState, error) {
	out := map[string]*crashState{}
	err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		if err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			out[info.Name] = &crashState{Kind: crashKindName(info.Kind), Parent: info.Parent, Labels: info.Labels}
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

// TestBoltCrashChild is the child half of TestBoltCrashConsistency: it
// writes random transactions until it is killed.
func TestBoltCrashChild(t *testing.T) {
	dir := os.Getenv(crashChildEnv)
	if dir == "" {
		t.Skip("the child half of TestBoltCrashConsistency, which re-executes the test binary with " + crashChildEnv + " set; nothing to do alone")
	}
	cycle, err := strconv.Atoi(os.Getenv(crashCycleEnv))
	require.NoError(t, err, crashCycleEnv)
	seed, err := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	require.NoError(t, err, crashSeedEnv)

	ms, err := storage.NewBoltMetaStore(filepath.Join(dir, crashDBFile))
	require.NoError(t, err)
	defer func() { assert.NoError(t, ms.Close()) }()
	snaps, err := crashRead(context.Background(), ms)
	require.NoError(t, err, "learning the state of the store")

	openLog := func(name string) *os.File {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		require.NoError(t, err)
		t.Cleanup(func() { _ = f.Close() })
		return f
	}
	w := &crashWorld{
		t:        t,
		ms:       ms,
		cycle:    cycle,
		intents:  openLog(crashIntentsLog),
		acked:    openLog(crashAckedLog),
		stop:     make(chan struct{}),
		snaps:    snaps,
		reserved: map[string]bool{},
	}
	limit := time.AfterFunc(crashChildLimit, w.halt)
	defer limit.Stop()

	fmt.Println(crashReady)
	var wg sync.WaitGroup
	for i := range crashWriters {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		wg.Go(func() { w.write(rng, i < crashGroupWriters) })
	}
	wg.Wait()
	t.Logf("not killed within %v: stopped after %d acknowledged transactions", crashChildLimit, w.acks.Load())
}

// crashWorld is the child's knowledge of the store and its writers'
// reservations.
type crashWorld struct {
	t              *testing.T
	ms             storage.MetaStore
	cycle          int
	intents, acked *os.File

	stop     chan struct{}
	stopOnce sync.Once
	seq      atomic.Int64 // numbers transactions and new names
	acks     atomic.Int64 // acknowledged transactions

	mu sync.Mutex
	// snaps is the state after every acknowledged transaction; its values
	// are never changed once stored, only replaced.
	snaps    map[string]*crashState
	reserved map[string]bool // names some transaction in flight uses
}

func (w *crashWorld) halt() { w.stopOnce.Do(func() { close(w.stop) }) }

func (w *crashWorld) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

func (w *crashWorld) fail(err error) {
	w.t.Errorf("crash child, cycle %d: %v", w.cycle, err)
	w.halt()
}

// write runs transactions until the child is stopped (or killed).
func (w *crashWorld) write(rng *rand.Rand, group bool) {
	for !w.stopped() {
		p := w.plan(rng, group)
		if err := crashAppend(w.intents, &p.tx, false); err != nil {
			w.fail(fmt.Errorf("writing intent: %w", err))
			return
		}
		if err := p.execute(w.ms); err != nil {
			w.fail(fmt.Errorf("transaction %s via %s %q: %w", p.tx.ID, p.tx.Via, p.tx.Ops, err))
			return
		}
		if !p.tx.Abort {
			if err := crashAppend(w.acked, &p.tx, true); err != nil {
				w.fail(fmt.Errorf("writing acknowledgement: %w", err))
				return
			}
			w.acks.Add(1)
		}
		w.finish(p)
	}
}

// crashAppend writes tx as one line, in one write (O_APPEND keeps
// concurrent lines whole), and fsyncs if asked.
func crashAppend(f *os.File, tx *crashTx, sync bool) error {
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
func (w *crashWorld) finish(p *crashPlan) {
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

// crashOp is one operation of a planned transaction.
type crashOp struct {
	do     string // "create", "commit", "remove", "label"
	kind   snapshots.Kind
	key    string // the active to commit
	name   string // the snapshot created, committed, removed or labelled
	parent string // of a create; the rebase target of a commit
	// base is the state the operation starts from: the parent of a create,
	// the active of a commit, the snapshot removed or labelled; its ID may
	// only be known once an earlier operation of the transaction ran.
	base   *crashState
	labels map[string]string
	paths  []string
	usage  snapshots.Usage
	want   *crashState // the post-state of name
}

// crashPlan is a transaction decided before it runs.
type crashPlan struct {
	tx  crashTx
	ops []crashOp
	// local is the transaction's view over the world: its own post-states
	// (nil: gone).
	local map[string]*crashState
	uses  map[string]bool // names reserved: touched or relied on
}

func (p *crashPlan) describe(format string, args ...any) {
	p.tx.Ops = append(p.tx.Ops, fmt.Sprintf(format, args...))
}

// plan decides a transaction of one to four operations on names no other
// transaction in flight uses, and reserves them.
func (w *crashWorld) plan(rng *rand.Rand, group bool) *crashPlan {
	w.mu.Lock()
	defer w.mu.Unlock()
	p := &crashPlan{
		tx:    crashTx{ID: fmt.Sprintf("%d.%d", w.cycle, w.seq.Add(1)), Via: "Commit", Effects: map[string]*crashState{}},
		local: map[string]*crashState{},
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
func (w *crashWorld) get(p *crashPlan, name string) *crashState {
	if st, ok := p.local[name]; ok {
		return st
	}
	return w.snaps[name]
}

// candidates returns, sorted, the names the transaction may use that
// satisfy ok.
func (w *crashWorld) candidates(p *crashPlan, ok func(name string, st *crashState) bool) []string {
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

func crashPick(rng *rand.Rand, names []string) string { return names[rng.IntN(len(names))] }

func (w *crashWorld) newName(prefix string) string {
	return fmt.Sprintf("%s-%d.%d", prefix, w.cycle, w.seq.Add(1))
}

func (w *crashWorld) planOp(rng *rand.Rand, p *crashPlan) {
	children := map[string]int{}
	for _, m := range []map[string]*crashState{w.snaps, p.local} {
		for name, st := range m {
			if cur := w.get(p, name); st != nil && cur == st && st.Parent != "" {
				children[st.Parent]++
			}
		}
	}
	committed := w.candidates(p, func(_ string, st *crashState) bool { return st.Kind == crashCommitted })
	actives := w.candidates(p, func(_ string, st *crashState) bool { return st.Kind == crashActive })
	leaves := w.candidates(p, func(name string, _ *crashState) bool { return children[name] == 0 })
	existing := w.candidates(p, func(string, *crashState) bool { return true })

	removeWeight := 15
	if len(existing) > crashTarget {
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
	op := crashOp{do: do}
	switch do {
	case "create":
		op.kind = snapshots.KindActive
		if rng.IntN(4) == 0 {
			op.kind = snapshots.KindView
		}
		op.name = w.newName(map[snapshots.Kind]string{snapshots.KindActive: "a", snapshots.KindView: "v"}[op.kind])
		if len(committed) > 0 && rng.IntN(5) != 0 {
			op.parent = crashPick(rng, committed)
			op.base = w.get(p, op.parent)
			p.uses[op.parent] = true
		}
		op.labels = txLabels()
		op.want = &crashState{Kind: crashKindName(op.kind), Parent: op.parent, Labels: op.labels}
		p.describe("create %s %q on %q", op.want.Kind, op.name, op.parent)
	case "commit":
		op.key = crashPick(rng, actives)
		op.base = w.get(p, op.key)
		op.name = w.newName("c")
		op.labels = txLabels()
		op.usage = snapshots.Usage{Size: 1 + rng.Int64N(1<<20), Inodes: 1 + rng.Int64N(100)}
		parent := op.base.Parent
		if parent == "" && len(committed) > 0 && rng.IntN(2) == 0 {
			op.parent = crashPick(rng, committed) // rebase on commit
			parent = op.parent
			p.uses[op.parent] = true
		}
		op.want = &crashState{Kind: crashCommitted, Parent: parent, Labels: op.labels, ID: op.base.ID, Size: op.usage.Size}
		p.local[op.key] = nil
		p.uses[op.key] = true
		p.describe("commit %q as %q onto %q", op.key, op.name, parent)
	case "remove":
		op.name = crashPick(rng, leaves)
		op.base = w.get(p, op.name)
		p.describe("remove %q", op.name)
	case "label":
		op.name = crashPick(rng, existing)
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

// errCrashAbort is how a transaction fails on purpose.
var errCrashAbort = errors.New("the transaction fails on purpose")

// execute runs the planned transaction and reports any unexpected outcome.
func (p *crashPlan) execute(ms storage.MetaStore) error {
	ctx := context.Background()
	if p.tx.Via == "WithTransaction" {
		err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			if err := p.run(ctx); err != nil {
				return err
			}
			if p.tx.Abort {
				return errCrashAbort
			}
			return nil
		})
		if p.tx.Abort && errors.Is(err, errCrashAbort) {
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
func (p *crashPlan) run(ctx context.Context) error {
	for i, op := range p.ops {
		if err := op.run(ctx); err != nil {
			return fmt.Errorf("%s: %w", p.tx.Ops[i], err)
		}
	}
	return nil
}

func crashWithParent(parent string) snapshots.Opt {
	return func(info *snapshots.Info) error {
		info.Parent = parent
		return nil
	}
}

func (op *crashOp) run(ctx context.Context) error {
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
			opts = append(opts, crashWithParent(op.parent))
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
		if id != op.base.ID || crashKindName(kind) != op.base.Kind {
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

// crashStats sums up what the cycles saw.
type crashStats struct {
	acked, aborted       int // acknowledged; failed on purpose
	extra, lost          int // in flight at the kill: visible entirely; not at all
	torn                 int // log lines cut by the kill
	maxSnaps             int
	startup, run, verify time.Duration
}

func TestBoltCrashConsistency(t *testing.T) {
	cycles := crashDefaultCycles
	if v := os.Getenv(crashCyclesEnv); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, crashCyclesEnv)
		cycles = n
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(crashSeedEnv); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, crashSeedEnv)
		seed = n
	}
	t.Logf("%d cycles, %s=%d", cycles, crashSeedEnv, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	dir := t.TempDir()
	began := time.Now()
	var (
		stats       crashStats
		model       = map[string]*crashState{}
		offsets     = map[string]int64{}
		everAborted = map[string]bool{}
	)
	for cycle := range cycles {
		runFor := crashMinRun + time.Duration(rng.Int64N(int64(crashMaxRun-crashMinRun)+1))
		crashRunChild(t, dir, cycle, rng.Uint64(), runFor, &stats)

		intents, torn := crashReadLog(t, filepath.Join(dir, crashIntentsLog), offsets)
		stats.torn += torn
		acks, torn := crashReadLog(t, filepath.Join(dir, crashAckedLog), offsets)
		stats.torn += torn

		start := time.Now()
		ms, err := storage.NewBoltMetaStore(filepath.Join(dir, crashDBFile))
		require.NoError(t, err, "cycle %d: reopening after the kill", cycle)
		problems, checkErr := storage.Check(context.Background(), ms)
		state, readErr := crashRead(context.Background(), ms)
		require.NoError(t, ms.Close())
		require.NoError(t, checkErr, "cycle %d: Check", cycle)
		if len(problems) > 0 {
			t.Fatalf("cycle %d (killed %v after ready): Check found problems after the kill (database and logs kept in %s):\n%v", cycle, runFor, crashKeep(t, dir), problems)
		}
		require.NoError(t, readErr, "cycle %d: reading the store", cycle)

		if !crashVerify(t, cycle, model, intents, acks, state, everAborted, &stats) {
			t.Fatalf("cycle %d (killed %v after ready): the store after the kill does not match the transactions (database and logs kept in %s)", cycle, runFor, crashKeep(t, dir))
		}
		model = state
		stats.maxSnaps = max(stats.maxSnaps, len(state))
		stats.verify += time.Since(start)
	}
	assert.GreaterOrEqual(t, stats.acked, cycles, "too few acknowledged transactions to prove anything")
	t.Logf("%d kill cycles in %v: %d acknowledged transactions, all present; %d in flight at a kill and visible entirely (committed, unacknowledged), %d in flight and not visible at all; %d failed on purpose, none visible; %d torn log lines; up to %d snapshots; child startup %v, writing %v, verification %v in all",
		cycles, time.Since(began).Round(time.Millisecond), stats.acked, stats.extra, stats.lost, stats.aborted, stats.torn, stats.maxSnaps,
		stats.startup.Round(time.Millisecond), stats.run.Round(time.Millisecond), stats.verify.Round(time.Millisecond))
}

// crashKeep copies the database and the logs out of the test's temporary
// directory, which is removed when the test ends, and returns where.
func crashKeep(t *testing.T, dir string) string {
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

// crashOutput collects the child's output and notices its ready line.
type crashOutput struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	once  sync.Once
	ready chan struct{}
}

func (o *crashOutput) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(b)
	if bytes.Contains(o.buf.Bytes(), []byte(crashReady+"\n")) {
		o.once.Do(func() { close(o.ready) })
	}
	return len(b), nil
}

func (o *crashOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// crashRunChild starts a child on dir, lets it write for runFor once it is
// ready, and kills it with SIGKILL. The child must not end any other way.
func crashRunChild(t *testing.T, dir string, cycle int, seed uint64, runFor time.Duration, stats *crashStats) {
	t.Helper()
	out := &crashOutput{ready: make(chan struct{})}
	cmd := exec.Command(os.Args[0], "-test.run=^TestBoltCrashChild$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(),
		crashChildEnv+"="+dir,
		crashCycleEnv+"="+strconv.Itoa(cycle),
		crashSeedEnv+"="+strconv.FormatUint(seed, 10))
	cmd.Stdout, cmd.Stderr = out, out
	start := time.Now()
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	kill := func() {
		_ = cmd.Process.Kill()
		<-exited
	}
	select {
	case <-out.ready:
	case err := <-exited:
		t.Fatalf("cycle %d: the child ended (%v) before it was ready:\n%s", cycle, err, out)
	case <-time.After(time.Minute):
		kill()
		t.Fatalf("cycle %d: the child was not ready within a minute:\n%s", cycle, out)
	}
	ready := time.Now()
	stats.startup += ready.Sub(start)
	select {
	case err := <-exited:
		t.Fatalf("cycle %d: the child ended (%v) before it was killed:\n%s", cycle, err, out)
	case <-time.After(runFor):
	}
	kill()
	stats.run += time.Since(ready)

	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("cycle %d: the child ended with %v, not by SIGKILL:\n%s", cycle, cmd.ProcessState, out)
	}
	for _, bad := range []string{"WARNING: DATA RACE", "--- FAIL", "panic:", "crash child"} {
		if strings.Contains(out.String(), bad) {
			t.Fatalf("cycle %d: the child reported %q:\n%s", cycle, bad, out)
		}
	}
}

// crashReadLog returns the transactions of the whole lines appended to path
// since the last call, and cuts off a last line the kill left unfinished
// (returning 1 for it) so that the next child appends after whole lines.
func crashReadLog(t *testing.T, path string, offsets map[string]int64) ([]crashTx, int) {
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
	var txs []crashTx
	for line := range bytes.Lines(data[:end]) {
		var tx crashTx
		require.NoError(t, json.Unmarshal(line, &tx), "%s: %s", path, line)
		txs = append(txs, tx)
	}
	return txs, torn
}

// crashVerify checks the store's state after a kill against the model (the
// state verified after the previous kill), the acknowledged transactions
// and the intents of the cycle, and reports whether all is well.
func crashVerify(t *testing.T, cycle int, model map[string]*crashState, intents, acks []crashTx, state map[string]*crashState, everAborted map[string]bool, stats *crashStats) bool {
	t.Helper()
	ok := true
	errorf := func(format string, args ...any) {
		t.Errorf("cycle %d: "+format, append([]any{cycle}, args...)...)
		ok = false
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
	stats.acked += len(acks)

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
			stats.aborted++
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
			all = all && crashSame(got, post)
			none = none && crashSame(got, pre)
			diff = append(diff, fmt.Sprintf("\t%q: before %v, after %v, store has %v", name, pre, post, got))
		}
		switch {
		case none:
			stats.lost++
		case all:
			stats.extra++
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
	for _, name := range slices.Sorted(maps.Keys(crashUnion(state, expected))) {
		if _, flying := inFlight[name]; flying {
			continue
		}
		if got, want := state[name], expected[name]; !crashSame(got, want) {
			errorf("%q: store has %v, acknowledged transactions left %v (last touched by %s)", name, got, want, crashLastTouch(acks, name))
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
	return ok
}

func crashUnion(a, b map[string]*crashState) map[string]bool {
	out := map[string]bool{}
	for name := range a {
		out[name] = true
	}
	for name := range b {
		out[name] = true
	}
	return out
}

// crashLastTouch names the last acknowledged transaction of acks that
// touched name, for error messages.
func crashLastTouch(acks []crashTx, name string) string {
	for i := len(acks) - 1; i >= 0; i-- {
		if _, ok := acks[i].Effects[name]; ok {
			return fmt.Sprintf("acknowledged transaction %s %q", acks[i].ID, acks[i].Ops)
		}
	}
	return "no acknowledged transaction of this cycle"
}
