package storage_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// This file checks that the stores are linearizable (strictly serializable:
// every transaction appears to take effect at one instant between its call
// and its return) with porcupine. Several clients run random one-transaction
// operations on a small key space so that they contend; each operation's
// call and return times and its outcome are recorded, and porcupine searches
// for an order of the operations, consistent with real time, in which a
// sequential model of the store (the containerd rules over a map
// name -> {kind, parent, label}) produces exactly the observed outcomes.
//
// An operation whose outcome is unknown (an etcd commit that failed with
// Unavailable or a deadline: it may or may not have been applied) gets an
// unknown output and a return time of infinity, porcupine's convention: the
// model accepts any outcome for it and it may be linearized anywhere after
// its call, including after everything else (= not applied). An operation
// that certainly had no effect and observed nothing (it failed before
// committing, or gave up on a conflict) is left out of the history.
//
// On failure the test writes porcupine's visualization (HTML) under
// t.TempDir() (or $SNAPMETA_PORCUPINE_DIR, which survives the test) and logs
// its path and a textual summary: where porcupine's search got stuck, and
// the few reads and refusals that contradict one another, with the writes
// concurrent with them. SNAPMETA_LIN_SEED repeats the operations drawn.

// linOpKind is an operation of the workload; each runs in one transaction.
type linOpKind uint8

const (
	linPrepare  linOpKind = iota // CreateSnapshot(active, or view, Key on Parent, labels v=Value)
	linCommit                    // CommitActive(Key -> Name, labels v=Value), rebased on Parent if set
	linLayer                     // CreateSnapshot(Name+"-tmp" on Parent) + CommitActive(-> Name, v=Value)
	linRemove                    // Remove(Key)
	linPrune                     // Remove(Key) + Remove(its parent, if any)
	linSetLabel                  // UpdateInfo(Key, labels.v=Value)
	linIncr                      // GetInfo(Key) + UpdateInfo(Key, labels.v=old+1): read-modify-write
	linGet                       // GetInfo(Key), read-only
	linWalk                      // WalkInfo of everything, read-only
)

func (k linOpKind) String() string {
	return [...]string{"Prepare", "Commit", "Layer", "Remove", "Prune", "SetLabel", "Incr", "Get", "Walk"}[k]
}

func (k linOpKind) writable() bool { return k != linGet && k != linWalk }

// linInput is an operation's input. Only the fields its kind uses are set.
type linInput struct {
	Op     linOpKind
	Key    string
	Name   string
	Parent string
	Value  string
	View   bool // Prepare: a view rather than an active
}

// linOutput is an operation's observed outcome. Class is "ok" or the errdefs
// class of a refusal; only the fields the kind returns are set, and none on
// a refusal. Unknown means the outcome was not observed.
type linOutput struct {
	Unknown bool
	Class   string
	Kind    string
	Parent  string
	Label   string
	Listing string
}

// linSnap is one snapshot of the model.
type linSnap struct {
	kind   snapshots.Kind
	parent string
	label  string // the value of label "v", "" when absent
}

// linState is the model's state. A state is never changed once made: Step
// returns a modified copy.
type linState map[string]linSnap

func (s linState) with(name string, r linSnap) linState {
	n := maps.Clone(s)
	if n == nil {
		n = linState{}
	}
	n[name] = r
	return n
}

func (s linState) without(name string) linState {
	n := maps.Clone(s)
	delete(n, name)
	return n
}

func (s linState) listing() string {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(s)) {
		r := s[name]
		fmt.Fprintf(&b, "%s:%s:%s:%s;", name, r.kind, r.parent, r.label)
	}
	return b.String()
}

// linApply is the sequential specification: the outcome of in on s and the
// state after it, following the rules (and the order of their checks) of
// snapshot.go, which are containerd's.
func linApply(s linState, in linInput) (linOutput, linState) {
	ok := linOutput{Class: "ok"}
	refuse := func(class string) (linOutput, linState) { return linOutput{Class: class}, s }
	checkParent := func() string {
		if in.Parent == "" {
			return ""
		}
		p, found := s[in.Parent]
		if !found {
			return "NotFound"
		}
		if p.kind != snapshots.KindCommitted {
			return "InvalidArgument"
		}
		return ""
	}
	switch in.Op {
	case linPrepare:
		if c := checkParent(); c != "" {
			return refuse(c)
		}
		if _, found := s[in.Key]; found {
			return refuse("AlreadyExists")
		}
		kind := snapshots.KindActive
		if in.View {
			kind = snapshots.KindView
		}
		return ok, s.with(in.Key, linSnap{kind, in.Parent, in.Value})
	case linCommit:
		if _, found := s[in.Name]; found {
			return refuse("AlreadyExists")
		}
		r, found := s[in.Key]
		if !found {
			return refuse("NotFound")
		}
		if r.kind != snapshots.KindActive {
			return refuse("FailedPrecondition")
		}
		parent := r.parent
		switch {
		case in.Parent == "" || in.Parent == r.parent:
		case r.parent == "":
			// An active made without a parent is rebased on commit.
			p, found := s[in.Parent]
			if !found {
				return refuse("NotFound")
			}
			if p.kind != snapshots.KindCommitted {
				return refuse("FailedPrecondition")
			}
			parent = in.Parent
		default:
			return refuse("InvalidArgument")
		}
		return ok, s.without(in.Key).with(in.Name, linSnap{snapshots.KindCommitted, parent, in.Value})
	case linLayer:
		if c := checkParent(); c != "" {
			return refuse(c)
		}
		if _, found := s[in.Name]; found {
			return refuse("AlreadyExists")
		}
		return ok, s.with(in.Name, linSnap{snapshots.KindCommitted, in.Parent, in.Value})
	case linRemove, linPrune:
		remove := func(s linState, name string) (linSnap, linState, string) {
			r, found := s[name]
			if !found {
				return r, s, "NotFound"
			}
			for _, c := range s {
				if c.parent == name {
					return r, s, "FailedPrecondition"
				}
			}
			return r, s.without(name), ""
		}
		r, next, class := remove(s, in.Key)
		if class != "" {
			return refuse(class)
		}
		ok.Kind = r.kind.String()
		if in.Op == linPrune && r.parent != "" {
			if _, next, class = remove(next, r.parent); class != "" {
				return refuse(class)
			}
			ok.Parent = r.parent
		}
		return ok, next
	case linSetLabel, linIncr:
		r, found := s[in.Key]
		if !found {
			return refuse("NotFound")
		}
		if in.Op == linSetLabel {
			r.label = in.Value
		} else {
			n, _ := strconv.Atoi(r.label)
			r.label = strconv.Itoa(n + 1)
		}
		ok.Label = r.label
		return ok, s.with(in.Key, r)
	case linGet:
		r, found := s[in.Key]
		if !found {
			return refuse("NotFound")
		}
		ok.Kind, ok.Parent, ok.Label = r.kind.String(), r.parent, r.label
		return ok, s
	case linWalk:
		ok.Listing = s.listing()
		return ok, s
	}
	panic(fmt.Sprintf("unknown operation %d", in.Op))
}

func linDescribeInput(in linInput) string {
	switch in.Op {
	case linPrepare:
		if in.View {
			return fmt.Sprintf("View(%s, parent=%q, v=%s)", in.Key, in.Parent, in.Value)
		}
		return fmt.Sprintf("Prepare(%s, parent=%q, v=%s)", in.Key, in.Parent, in.Value)
	case linCommit:
		if in.Parent != "" {
			return fmt.Sprintf("Commit(%s -> %s, parent=%q, v=%s)", in.Key, in.Name, in.Parent, in.Value)
		}
		return fmt.Sprintf("Commit(%s -> %s, v=%s)", in.Key, in.Name, in.Value)
	case linLayer:
		return fmt.Sprintf("Layer(%s, parent=%q, v=%s)", in.Name, in.Parent, in.Value)
	case linSetLabel:
		return fmt.Sprintf("SetLabel(%s, v=%s)", in.Key, in.Value)
	case linWalk:
		return "Walk()"
	}
	return fmt.Sprintf("%s(%s)", in.Op, in.Key)
}

func linDescribeOutput(op linOpKind, out linOutput) string {
	switch {
	case out.Unknown:
		return "unknown"
	case out.Class != "ok":
		return out.Class
	case op == linWalk:
		return "[" + strings.TrimSuffix(strings.ReplaceAll(out.Listing, ";", "; "), "; ") + "]"
	}
	var parts []string
	for _, f := range []struct{ k, v string }{{"kind", out.Kind}, {"parent", out.Parent}, {"v", out.Label}} {
		if f.v != "" {
			parts = append(parts, f.k+"="+f.v)
		}
	}
	if len(parts) == 0 {
		return "ok"
	}
	return "ok{" + strings.Join(parts, " ") + "}"
}

// linModel is the porcupine model of a store.
var linModel = porcupine.Model{
	Init: func() any { return linState{} },
	Step: func(state, input, output any) (bool, any) {
		want, next := linApply(state.(linState), input.(linInput))
		out := output.(linOutput)
		if out.Unknown {
			return true, next
		}
		return want == out, next
	},
	Equal: func(a, b any) bool { return maps.Equal(a.(linState), b.(linState)) },
	Hash: func(state any) uint64 {
		h := fnv.New64a()
		_, _ = h.Write([]byte(state.(linState).listing()))
		return h.Sum64()
	},
	DescribeOperation: func(input, output any) string {
		in := input.(linInput)
		return linDescribeInput(in) + " -> " + linDescribeOutput(in.Op, output.(linOutput))
	},
	DescribeState: func(state any) string {
		s := state.(linState)
		if len(s) == 0 {
			return "{}"
		}
		return "{" + strings.TrimSuffix(strings.ReplaceAll(s.listing(), ";", "; "), "; ") + "}"
	},
	DescribeOperationMetadata: func(info any) string {
		if info == nil {
			return ""
		}
		return fmt.Sprintf("#%v", info)
	},
}

// linErrClass names the errdefs class of err ("ok" for nil). Refusals are
// tested first: an error of a refusal class never comes from the engine's
// plumbing.
func linErrClass(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errdefs.IsNotFound(err):
		return "NotFound"
	case errdefs.IsAlreadyExists(err):
		return "AlreadyExists"
	case errdefs.IsInvalidArgument(err):
		return "InvalidArgument"
	case errdefs.IsFailedPrecondition(err):
		return "FailedPrecondition"
	case errdefs.IsConflict(err):
		return "Conflict"
	case errdefs.IsUnavailable(err):
		return "Unavailable"
	case errors.Is(err, context.DeadlineExceeded):
		return "DeadlineExceeded"
	case errors.Is(err, context.Canceled):
		return "Canceled"
	}
	return "other"
}

func linIsRefusal(class string) bool {
	switch class {
	case "NotFound", "AlreadyExists", "InvalidArgument", "FailedPrecondition":
		return true
	}
	return false
}

// linOutcome says what a call's result tells about its effect.
type linOutcome int

const (
	linCertain    linOutcome = iota // the output is what happened
	linAmbiguous                    // a commit failed: applied entirely or not at all
	linNoEffect                     // certainly not applied, nothing observed
	linUnexpected                   // an error no operation should return
)

// linRun runs in as one transaction on ms and returns its output and what
// the result tells. manual uses TransactionContext and Commit (no retry)
// instead of WithTransaction. err is the error of the call.
func linRun(ctx context.Context, ms storage.MetaStore, in linInput, manual bool) (linOutput, linOutcome, error) {
	writable := in.Op.writable()
	var out linOutput
	reachedCommit := false
	fn := func(ctx context.Context) error {
		reachedCommit = false
		out = linOutput{Class: "ok"}
		v := map[string]string{"v": in.Value}
		var err error
		switch in.Op {
		case linPrepare:
			kind := snapshots.KindActive
			if in.View {
				kind = snapshots.KindView
			}
			_, err = storage.CreateSnapshot(ctx, kind, in.Key, in.Parent, snapshots.WithLabels(v))
		case linCommit:
			rebase := func(info *snapshots.Info) error { info.Parent = in.Parent; return nil }
			_, err = storage.CommitActive(ctx, in.Key, in.Name, snapshots.Usage{}, snapshots.WithLabels(v), rebase)
		case linLayer:
			tmp := in.Name + "-tmp"
			if _, err = storage.CreateSnapshot(ctx, snapshots.KindActive, tmp, in.Parent); err == nil {
				_, err = storage.CommitActive(ctx, tmp, in.Name, snapshots.Usage{Size: 1}, snapshots.WithLabels(v))
			}
		case linRemove, linPrune:
			var info snapshots.Info
			if in.Op == linPrune {
				if _, info, _, err = storage.GetInfo(ctx, in.Key); err != nil {
					break
				}
			}
			var kind snapshots.Kind
			if _, kind, err = storage.Remove(ctx, in.Key); err == nil && info.Parent != "" {
				_, _, err = storage.Remove(ctx, info.Parent)
				out.Parent = info.Parent
			}
			out.Kind = kind.String()
		case linSetLabel:
			var info snapshots.Info
			info, err = storage.UpdateInfo(ctx, snapshots.Info{Name: in.Key, Labels: v}, "labels.v")
			out.Label = info.Labels["v"]
		case linIncr:
			var info snapshots.Info
			if _, info, _, err = storage.GetInfo(ctx, in.Key); err == nil {
				n, _ := strconv.Atoi(info.Labels["v"])
				info, err = storage.UpdateInfo(ctx, snapshots.Info{Name: in.Key, Labels: map[string]string{"v": strconv.Itoa(n + 1)}}, "labels.v")
				out.Label = info.Labels["v"]
			}
		case linGet:
			var info snapshots.Info
			_, info, _, err = storage.GetInfo(ctx, in.Key)
			out.Kind, out.Parent, out.Label = info.Kind.String(), info.Parent, info.Labels["v"]
		case linWalk:
			var b strings.Builder
			err = storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
				fmt.Fprintf(&b, "%s:%s:%s:%s;", info.Name, info.Kind, info.Parent, info.Labels["v"])
				return nil
			})
			out.Listing = b.String()
		}
		reachedCommit = err == nil && writable
		return err
	}
	var err error
	if manual {
		err = linManual(ctx, ms, writable, fn)
	} else {
		err = ms.WithTransaction(ctx, writable, fn)
	}
	class := linErrClass(err)
	switch {
	case err == nil:
		return out, linCertain, nil
	case linIsRefusal(class) && !reachedCommit:
		return linOutput{Class: class}, linCertain, err
	case class == "Conflict":
		// Commit refused by etcd's compares, or WithTransaction gave up
		// retrying: nothing applied.
		return linOutput{}, linNoEffect, err
	case (class == "Unavailable" || class == "DeadlineExceeded" || class == "Canceled") && reachedCommit:
		return linOutput{Unknown: true}, linAmbiguous, err
	case class == "Unavailable" || class == "DeadlineExceeded" || class == "Canceled":
		// Failed before Commit was sent.
		return linOutput{}, linNoEffect, err
	}
	return linOutput{}, linUnexpected, fmt.Errorf("unexpected error class %s (commit reached: %v): %w", class, reachedCommit, err)
}

// linManual runs fn in a transaction from TransactionContext and commits it
// (or rolls it back), as a driver does by hand.
func linManual(ctx context.Context, ms storage.MetaStore, writable bool, fn func(ctx context.Context) error) error {
	tctx, tx, err := ms.TransactionContext(ctx, writable)
	if err != nil {
		return err
	}
	if err := fn(tctx); err != nil || !writable {
		return errors.Join(err, tx.Rollback())
	}
	return tx.Commit()
}

// linGen draws random operations over a small key space: actives a0..a2,
// committed c0..c2 (and, to provoke InvalidArgument, actives as parents).
type linGen struct{ rng *rand.Rand }

func (g linGen) pick(names ...string) string { return names[g.rng.IntN(len(names))] }

func (g linGen) active() string    { return g.pick("a0", "a1", "a2") }
func (g linGen) committed() string { return g.pick("c0", "c1", "c2") }
func (g linGen) any() string       { return g.pick("a0", "a1", "a2", "c0", "c1", "c2") }
func (g linGen) value() string     { return strconv.Itoa(1 + g.rng.IntN(9)) }

func (g linGen) parent() string {
	switch n := g.rng.IntN(10); {
	case n < 3:
		return ""
	case n < 9:
		return g.committed()
	}
	return g.active()
}

func (g linGen) next() linInput {
	switch n := g.rng.IntN(100); {
	case n < 18:
		return linInput{Op: linPrepare, Key: g.active(), Parent: g.parent(), Value: g.value(), View: n < 3}
	case n < 32:
		in := linInput{Op: linCommit, Key: g.active(), Name: g.committed(), Value: g.value()}
		if n < 22 {
			in.Parent = g.parent()
		}
		return in
	case n < 42:
		return linInput{Op: linLayer, Name: g.committed(), Parent: g.parent(), Value: g.value()}
	case n < 53:
		return linInput{Op: linRemove, Key: g.any()}
	case n < 58:
		return linInput{Op: linPrune, Key: g.any()}
	case n < 63:
		return linInput{Op: linSetLabel, Key: g.any(), Value: g.value()}
	case n < 73:
		return linInput{Op: linIncr, Key: g.any()}
	case n < 88:
		return linInput{Op: linGet, Key: g.any()}
	}
	return linInput{Op: linWalk}
}

// linClient is one client of a workload.
type linClient struct {
	ms     storage.MetaStore
	manual bool // every other write by hand (TransactionContext + Commit)
}

// linStats counts outcomes, for the log.
type linStats struct {
	mu      sync.Mutex
	classes map[string]int
	dropped int
	unknown int
}

func (s *linStats) add(class string, o linOutcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.classes == nil {
		s.classes = map[string]int{}
	}
	s.classes[class]++
	switch o {
	case linNoEffect:
		s.dropped++
	case linAmbiguous:
		s.unknown++
	}
}

func (s *linStats) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("outcomes %v; %d left out (certainly no effect), %d unknown", s.classes, s.dropped, s.unknown)
}

// linWorkload runs the clients concurrently, each doing ops operations (or
// until stop is closed, when ops is 0), and returns the history.
func linWorkload(t *testing.T, seed uint64, clients []linClient, ops int, callTimeout time.Duration, stop <-chan struct{}) ([]porcupine.Operation, *linStats) {
	t.Helper()
	start := time.Now()
	now := func() int64 { return time.Since(start).Nanoseconds() }
	stats := &linStats{}
	histories := make([][]porcupine.Operation, len(clients))
	var wg sync.WaitGroup
	for c, cl := range clients {
		wg.Go(func() {
			g := linGen{rand.New(rand.NewPCG(seed, uint64(c)))}
			for i := 0; ops == 0 || i < ops; i++ {
				if stop != nil {
					select {
					case <-stop:
						return
					default:
					}
				}
				in := g.next()
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				call := now()
				out, outcome, err := linRun(ctx, cl.ms, in, cl.manual && i%2 == 1)
				ret := now()
				cancel()
				stats.add(linErrClass(err), outcome)
				if outcome == linUnexpected {
					t.Errorf("client %d: %s: %v", c, linDescribeInput(in), err)
					return
				}
				switch outcome {
				case linNoEffect:
					continue
				case linAmbiguous:
					ret = math.MaxInt64
				}
				histories[c] = append(histories[c], porcupine.Operation{ClientId: c, Input: in, Call: call, Output: out, Return: ret})
			}
		})
	}
	wg.Wait()
	var history []porcupine.Operation
	for _, h := range histories {
		history = append(history, h...)
	}
	for i := range history {
		history[i].Metadata = i
	}
	return history, stats
}

// linCheckTimeout bounds porcupine's search; the histories here take well
// under a second.
const linCheckTimeout = 30 * time.Second

// linAssertLinearizable fails the test unless porcupine finds the history
// linearizable within the timeout, and reports why not.
func linAssertLinearizable(t *testing.T, history []porcupine.Operation) {
	t.Helper()
	require.NotEmpty(t, history)
	start := time.Now()
	res := porcupine.CheckOperationsTimeout(linModel, history, linCheckTimeout)
	t.Logf("porcupine: %s for %d operations in %v", res, len(history), time.Since(start).Round(time.Millisecond))
	if res == porcupine.Ok {
		return
	}
	if res == porcupine.Unknown {
		t.Fatalf("porcupine could not decide within %v whether the %d operations are linearizable: "+
			"the history is too large or too concurrent for the checker; this is not a pass", linCheckTimeout, len(history))
	}
	path, summary := linReport(t, history)
	t.Fatalf("history of %d operations is NOT linearizable (porcupine: %s)\nvisualization: %s\n%s", len(history), res, path, summary)
}

// linReport writes porcupine's visualization of history and returns its
// path and a textual summary: the longest linearizable prefix found, the
// state it leads to, and the pending operations none of which can come
// next; then the few reads and refusals that contradict one another (found
// by dropping the others while the history stays illegal) and the writes
// concurrent with them, which is usually the whole story.
func linReport(t *testing.T, history []porcupine.Operation) (string, string) {
	t.Helper()
	res, info := porcupine.CheckOperationsVerbose(linModel, history, linCheckTimeout)
	dir := os.Getenv("SNAPMETA_PORCUPINE_DIR")
	if dir == "" {
		dir = t.TempDir()
	}
	path := filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())+".html")
	if err := porcupine.VisualizePath(linModel, info, path); err != nil {
		path = fmt.Sprintf("(visualization failed: %v)", err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "verbose check: %s\n", res)
	describe := func(op porcupine.Operation) string {
		ret := "∞"
		if op.Return != math.MaxInt64 {
			ret = time.Duration(op.Return).String()
		}
		return fmt.Sprintf("#%v client %d [%v, %s] %s", op.Metadata, op.ClientId, time.Duration(op.Call),
			ret, linModel.DescribeOperation(op.Input, op.Output))
	}
	for _, partials := range info.PartialLinearizationsOperations() {
		var longest []porcupine.Operation
		for _, p := range partials {
			if len(p) > len(longest) {
				longest = p
			}
		}
		state := linModel.Init()
		done := map[any]bool{}
		fmt.Fprintf(&b, "longest linearizable prefix: %d of %d operations; its last steps:\n", len(longest), len(history))
		for i, op := range longest {
			_, state = linModel.Step(state, op.Input, op.Output)
			done[op.Metadata] = true
			if i >= len(longest)-12 {
				fmt.Fprintf(&b, "  %s\n    => %s\n", describe(op), linModel.DescribeState(state))
			}
		}
		var pending []porcupine.Operation
		minReturn := int64(math.MaxInt64)
		for _, op := range history {
			if !done[op.Metadata] {
				pending = append(pending, op)
				minReturn = min(minReturn, op.Return)
			}
		}
		slices.SortFunc(pending, func(a, b porcupine.Operation) int { return cmp.Compare(a.Call, b.Call) })
		fmt.Fprintf(&b, "none of these operations (pending at that point, called before the first of them returned) can come next:\n")
		for _, op := range pending {
			if op.Call > minReturn {
				break
			}
			in := op.Input.(linInput)
			want, _ := linApply(state.(linState), in)
			fmt.Fprintf(&b, "  %s   (the model says: %s)\n", describe(op), linDescribeOutput(in.Op, want))
		}
	}
	claims, rest := linMinimize(history, 15*time.Second)
	fmt.Fprintf(&b, "reads and refusals that cannot all hold together (all the other reads and refusals dropped, the history stays non-linearizable; %d writes kept):\n", len(rest))
	lo, hi := int64(math.MaxInt64), int64(0)
	for _, op := range claims {
		fmt.Fprintf(&b, "  %s\n", describe(op))
		lo, hi = min(lo, op.Call), max(hi, op.Return)
	}
	if len(claims) == 0 {
		fmt.Fprintf(&b, "  (none: the acknowledged writes alone contradict each other)\n")
		lo, hi = 0, math.MaxInt64
	}
	fmt.Fprintf(&b, "the writes that overlap them in time:\n")
	shown := 0
	for _, op := range rest {
		if op.Call <= hi && op.Return >= lo {
			if shown++; shown > 30 {
				fmt.Fprintf(&b, "  ...\n")
				break
			}
			fmt.Fprintf(&b, "  %s\n", describe(op))
		}
	}
	return path, b.String()
}

// linChangesNothing reports whether op changed nothing: a read, or a refusal.
// Dropping such an operation from a linearizable history leaves it
// linearizable, so what is left of an illegal history after dropping some
// is still a genuine violation.
func linChangesNothing(op porcupine.Operation) bool {
	out := op.Output.(linOutput)
	return !op.Input.(linInput).Op.writable() || (!out.Unknown && out.Class != "ok")
}

// linMinimize drops reads and refusals from an illegal history for as long
// as it stays illegal (within budget), and returns the reads and refusals
// left, and the writes, each in call order.
func linMinimize(history []porcupine.Operation, budget time.Duration) (claims, writes []porcupine.Operation) {
	for _, op := range history {
		if linChangesNothing(op) {
			claims = append(claims, op)
		} else {
			writes = append(writes, op)
		}
	}
	deadline := time.Now().Add(budget)
	for chunk := max(len(claims)/2, 1); ; chunk /= 2 {
		for i := 0; i < len(claims) && time.Now().Before(deadline); {
			cand := slices.Concat(claims[:i], claims[min(i+chunk, len(claims)):])
			if porcupine.CheckOperationsTimeout(linModel, slices.Concat(writes, cand), time.Second) == porcupine.Illegal {
				claims = cand
				continue
			}
			i += chunk
		}
		if chunk == 1 {
			break
		}
	}
	byCall := func(a, b porcupine.Operation) int { return cmp.Compare(a.Call, b.Call) }
	slices.SortFunc(claims, byCall)
	slices.SortFunc(writes, byCall)
	return claims, writes
}

// linOpenBolt opens a bbolt store in a fresh directory, closed at the end
// of the test.
func linOpenBolt(t *testing.T, opts ...storage.BoltOpt) storage.MetaStore {
	t.Helper()
	ms, err := storage.NewBoltMetaStore(filepath.Join(t.TempDir(), "metadata.db"), opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ms.Close() })
	return ms
}

// linCheckStore asserts that Check finds nothing wrong with ms, retrying
// while a recovering cluster answers Unavailable.
func linCheckStore(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	var problems []storage.Problem
	var err error
	for range 20 {
		if problems, err = storage.Check(context.Background(), ms); !errdefs.IsUnavailable(err) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	require.NoError(t, err)
	require.Empty(t, problems, "Check after the workload")
}

func linSeed(t *testing.T) uint64 {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SNAPMETA_LIN_SEED"); s != "" {
		var err error
		seed, err = strconv.ParseUint(s, 10, 64)
		require.NoError(t, err)
	}
	t.Logf("seed %d (set SNAPMETA_LIN_SEED to repeat the operations drawn)", seed)
	return seed
}

func TestLinearizabilityBolt(t *testing.T) {
	linBolt(t)
}

// TestLinearizabilityBoltParallel runs the same workload on a store with
// parallel callbacks: optimistic callbacks race with one another and with
// ordinary transactions.
func TestLinearizabilityBoltParallel(t *testing.T) {
	for round := range 3 {
		t.Run(fmt.Sprint(round), func(t *testing.T) { linBolt(t, storage.WithParallelCallbacks()) })
	}
}

func linBolt(t *testing.T, opts ...storage.BoltOpt) {
	seed := linSeed(t)
	ms := linOpenBolt(t, opts...)
	clients := make([]linClient, 6)
	for i := range clients {
		// Half the clients write by hand half the time: ordinary bbolt
		// transactions race with group commits.
		clients[i] = linClient{ms: ms, manual: i%2 == 1}
	}
	history, stats := linWorkload(t, seed, clients, 120, 10*time.Second, nil)
	t.Log(stats)
	linCheckStore(t, ms)
	linAssertLinearizable(t, history)
}

// TestSerializabilityBoltRefusedCallbackWaitsForGroupCommit pins down, in
// a fixed schedule, the violation TestLinearizabilityBolt finds: in a group
// commit, a callback that is refused because of an earlier member's
// uncommitted write must not return before that write is committed (the
// group's documented promise: "Every caller returns only after that
// commit"), or a reader that starts after the refusal sees a store in which
// the refusal's reason does not exist (and, were the commit to fail, never
// will).
func TestSerializabilityBoltRefusedCallbackWaitsForGroupCommit(t *testing.T) {
	for _, mode := range []struct {
		name string
		opts []storage.BoltOpt
	}{{"group", nil}, {"parallel", []storage.BoltOpt{storage.WithParallelCallbacks()}}} {
		t.Run(mode.name, func(t *testing.T) { linRefusedCallbackWaits(t, mode.opts...) })
	}
	t.Run("parallel, validated against the open group", linRefusedCallbackWaitsParallel)
}

// linRefusedCallbackWaitsParallel is the same schedule for parallel
// callbacks: A holds the group open on the shared transaction (a walk puts
// it there) after creating k; B creates k on its snapshot, where k does not
// exist yet, so its validation fails against A's open write and it runs
// again serially: AlreadyExists, returned only after A's commit; C, behind,
// keeps the group open a while.
func linRefusedCallbackWaitsParallel(t *testing.T) {
	ms := linOpenBolt(t, storage.WithParallelCallbacks())
	ctx := context.Background()
	create := func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "k", "")
		return err
	}
	walk := func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
	}
	created, release, doneA := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	var once sync.Once
	go func() {
		doneA <- ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			if err := walk(ctx); err != nil {
				return err
			}
			err := create(ctx)
			once.Do(func() { close(created) })
			<-release
			return err
		})
	}()
	<-created
	runsB := atomic.Int32{}
	doneB, doneC := make(chan error, 1), make(chan error, 1)
	go func() {
		doneB <- ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			runsB.Add(1)
			return create(ctx)
		})
	}()
	time.Sleep(50 * time.Millisecond)
	go func() {
		doneC <- ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			if err := walk(ctx); err != nil {
				return err
			}
			time.Sleep(300 * time.Millisecond)
			return nil
		})
	}()
	time.Sleep(50 * time.Millisecond)
	close(release)

	errB := <-doneB
	require.True(t, errdefs.IsAlreadyExists(errB), "B: %v", errB)
	assert.Equal(t, int32(2), runsB.Load(), "B ran again after its validation failed")
	var errRead error
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, _, _, errRead = storage.GetInfo(ctx, "k")
		return nil
	}))
	require.NoError(t, <-doneA)
	require.NoError(t, <-doneC)
	require.NoError(t, errRead, "B returned AlreadyExists for k, so a reader that starts after B returned must find k")
}

func linRefusedCallbackWaits(t *testing.T, opts ...storage.BoltOpt) {
	ms := linOpenBolt(t, opts...)
	parallel := storage.ParallelCallbacks(ms)
	ctx := context.Background()
	create := func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "k", "")
		return err
	}
	// A creates k and holds the group open until B and C queue behind it.
	created, release, doneA := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	var once sync.Once
	go func() {
		doneA <- ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			err := create(ctx)
			once.Do(func() { close(created) })
			<-release
			return err
		})
	}()
	<-created
	// B is refused (k exists in the group's transaction); C, behind it,
	// keeps the group from committing for a while.
	doneB, doneC := make(chan error, 1), make(chan error, 1)
	go func() { doneB <- ms.WithTransaction(ctx, true, create) }()
	time.Sleep(50 * time.Millisecond)
	go func() {
		doneC <- ms.WithTransaction(ctx, true, func(context.Context) error {
			time.Sleep(300 * time.Millisecond)
			return nil
		})
	}()
	time.Sleep(50 * time.Millisecond)
	close(release)

	errB := <-doneB
	if parallel {
		// A's create waits in its callback, on its snapshot, so B's
		// create (side by side) wins, and A runs again: AlreadyExists.
		require.NoError(t, errB, "B")
		errA := <-doneA
		require.True(t, errdefs.IsAlreadyExists(errA), "A: %v", errA)
		require.NoError(t, <-doneC)
		return
	}
	require.True(t, errdefs.IsAlreadyExists(errB), "B: %v", errB)
	var errRead error
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, _, _, errRead = storage.GetInfo(ctx, "k")
		return nil
	}))
	require.NoError(t, <-doneA)
	require.NoError(t, <-doneC)
	require.NoError(t, errRead, "B returned AlreadyExists for k, so a reader that starts after B returned must find k")
}

// linEtcdClients opens n stores on cfg, each with its own client and
// extra options, closed at the end of the test; every other one walks in
// pages of 2.
func linEtcdClients(t *testing.T, c *etcdtest.Cluster, root string, n int, requestTimeout time.Duration, extra ...storage.EtcdOpt) []linClient {
	t.Helper()
	clients := make([]linClient, n)
	for i := range clients {
		cfg := c.ClientConfig()
		opts := append([]storage.EtcdOpt{storage.WithRequestTimeout(requestTimeout)}, extra...)
		if i%2 == 1 {
			opts = append(opts, storage.WithPageSize(2))
		}
		ms, err := storage.NewEtcdStore(root, &cfg, opts...)
		require.NoError(t, err)
		t.Cleanup(func() { _ = ms.Close() })
		clients[i] = linClient{ms: ms}
	}
	return clients
}

func TestLinearizabilityEtcd(t *testing.T) {
	seed := linSeed(t)
	c := etcdtest.Start(t)
	clients := linEtcdClients(t, c, "lin", 5, 5*time.Second)
	history, stats := linWorkload(t, seed, clients, 150, 10*time.Second, nil)
	t.Log(stats)
	linCheckStore(t, clients[0].ms)
	linAssertLinearizable(t, history)
}

// TestLinearizabilityEtcdWatchCache runs the workload on stores that read
// their watch caches' copies: stale copies may cost conflicts and retries,
// never an answer no serial order gives.
func TestLinearizabilityEtcdWatchCache(t *testing.T) {
	seed := linSeed(t)
	c := etcdtest.Start(t)
	clients := linEtcdClients(t, c, "lin-cache", 5, 5*time.Second, storage.WithWatchCache())
	history, stats := linWorkload(t, seed, clients, 150, 10*time.Second, nil)
	t.Log(stats)
	linCheckStore(t, clients[0].ms)
	linAssertLinearizable(t, history)
}

// TestLinearizabilityEtcdWatchCacheUnderFaults is the faults' workload
// (see TestLinearizabilityEtcdUnderFaults) on stores with watch caches,
// whose watches break with the leader and the quorum.
func TestLinearizabilityEtcdWatchCacheUnderFaults(t *testing.T) {
	linEtcdUnderFaults(t, "lin-cache-faults", storage.WithWatchCache())
}

// TestLinearizabilityEtcdUnderFaults runs the workload on a 3-member
// cluster whose leader is stopped and restarted, and which then loses its
// quorum for a while (two followers stopped together): commits cut off by
// the faults have unknown outcomes, and may be applied after the client
// gave up on them.
func TestLinearizabilityEtcdUnderFaults(t *testing.T) {
	linEtcdUnderFaults(t, "lin-faults")
}

// linEtcdUnderFaults runs the faults' workload on four clients opened with
// extra options.
func linEtcdUnderFaults(t *testing.T, root string, extra ...storage.EtcdOpt) {
	seed := linSeed(t)
	c := etcdtest.StartCluster(t, 3)
	clients := linEtcdClients(t, c, root, 4, 2*time.Second, extra...)
	stop := make(chan struct{})
	faults := make(chan error, 1)
	go func() {
		defer close(stop)
		faults <- linFaults(c)
		time.Sleep(2 * time.Second)
	}()
	history, stats := linWorkload(t, seed, clients, 0, 4*time.Second, stop)
	require.NoError(t, <-faults)
	t.Log(stats)
	linCheckStore(t, clients[0].ms)
	linAssertLinearizable(t, history)
}

// linFaults stops and restarts the leader of c, then two followers at once.
// It runs beside the workload, so it reports errors rather than failing the
// test.
func linFaults(c *etcdtest.Cluster) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	time.Sleep(2 * time.Second)
	leader, err := c.WaitLeader(ctx)
	if err != nil {
		return err
	}
	c.Stop(leader)
	time.Sleep(2 * time.Second)
	if err := c.Restart(leader); err != nil {
		return err
	}
	if leader, err = c.WaitLeader(ctx); err != nil {
		return err
	}
	time.Sleep(time.Second)
	var followers []int
	for i := range c.N() {
		if i != leader {
			followers = append(followers, i)
		}
	}
	for _, f := range followers {
		c.Stop(f)
	}
	time.Sleep(2500 * time.Millisecond)
	for _, f := range followers {
		if err := c.Restart(f); err != nil {
			return err
		}
	}
	_, err = c.WaitLeader(ctx)
	return err
}

// TestLinearizabilityCheckerRejectsBadHistories makes sure the model and the
// checker can fail: each hand-written history is impossible for a
// serializable store.
func TestLinearizabilityCheckerRejectsBadHistories(t *testing.T) {
	ms := int64(time.Millisecond)
	op := func(client int, call, ret int64, in linInput, out linOutput) porcupine.Operation {
		return porcupine.Operation{ClientId: client, Input: in, Call: call * ms, Output: out, Return: ret * ms}
	}
	ok := linOutput{Class: "ok"}
	prepareA0 := linInput{Op: linPrepare, Key: "a0", Value: "1"}
	getA0 := linInput{Op: linGet, Key: "a0"}
	found := linOutput{Class: "ok", Kind: "Active", Label: "1"}
	for _, tc := range []struct {
		name    string
		history []porcupine.Operation
		want    porcupine.CheckResult
	}{
		{"stale read after an acknowledged create", []porcupine.Operation{
			op(0, 0, 10, prepareA0, ok),
			op(1, 20, 30, getA0, linOutput{Class: "NotFound"}),
		}, porcupine.Illegal},
		{"one key created twice", []porcupine.Operation{
			op(0, 0, 10, prepareA0, ok),
			op(1, 0, 10, linInput{Op: linPrepare, Key: "a0", Value: "2"}, ok),
		}, porcupine.Illegal},
		{"lost update of two concurrent increments", []porcupine.Operation{
			op(0, 0, 10, linInput{Op: linLayer, Name: "c0", Value: "5"}, ok),
			op(1, 20, 40, linInput{Op: linIncr, Key: "c0"}, linOutput{Class: "ok", Label: "6"}),
			op(2, 20, 40, linInput{Op: linIncr, Key: "c0"}, linOutput{Class: "ok", Label: "6"}),
		}, porcupine.Illegal},
		{"parent removed while a child was prepared on it", []porcupine.Operation{
			op(0, 0, 10, linInput{Op: linLayer, Name: "c0", Value: "1"}, ok),
			op(1, 20, 40, linInput{Op: linPrepare, Key: "a0", Parent: "c0", Value: "1"}, ok),
			op(2, 20, 40, linInput{Op: linRemove, Key: "c0"}, linOutput{Class: "ok", Kind: "Committed"}),
		}, porcupine.Illegal},
		{"prune that leaves the parent behind", []porcupine.Operation{
			op(0, 0, 10, linInput{Op: linLayer, Name: "c0", Value: "1"}, ok),
			op(0, 20, 30, linInput{Op: linPrepare, Key: "a0", Parent: "c0", Value: "1"}, ok),
			op(0, 40, 50, linInput{Op: linPrune, Key: "a0"}, linOutput{Class: "ok", Kind: "Active", Parent: "c0"}),
			op(1, 60, 70, linInput{Op: linGet, Key: "c0"}, linOutput{Class: "ok", Kind: "Committed", Label: "1"}),
		}, porcupine.Illegal},
		{"half a transaction visible", []porcupine.Operation{
			op(0, 0, 10, prepareA0, ok),
			op(0, 20, 30, linInput{Op: linCommit, Key: "a0", Name: "c0", Value: "2"}, ok),
			op(1, 40, 50, linInput{Op: linWalk}, linOutput{Class: "ok", Listing: "a0:Active::1;c0:Committed::2;"}),
		}, porcupine.Illegal},
		// Sanity checks the other way: these are fine.
		{"concurrent create and read, either order", []porcupine.Operation{
			op(0, 0, 10, prepareA0, ok),
			op(1, 5, 15, getA0, linOutput{Class: "NotFound"}),
			op(2, 5, 15, getA0, found),
		}, porcupine.Ok},
		{"unknown outcome applied", []porcupine.Operation{
			{ClientId: 0, Input: prepareA0, Call: 0, Output: linOutput{Unknown: true}, Return: math.MaxInt64},
			op(1, 20, 30, getA0, found),
		}, porcupine.Ok},
		{"unknown outcome not applied", []porcupine.Operation{
			{ClientId: 0, Input: prepareA0, Call: 0, Output: linOutput{Unknown: true}, Return: math.MaxInt64},
			op(1, 20, 30, getA0, linOutput{Class: "NotFound"}),
		}, porcupine.Ok},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i := range tc.history {
				tc.history[i].Metadata = i
			}
			got := porcupine.CheckOperationsTimeout(linModel, tc.history, 5*time.Second)
			require.Equal(t, tc.want, got)
			if got == porcupine.Illegal {
				path, summary := linReport(t, tc.history)
				require.FileExists(t, path)
				require.Contains(t, summary, "can come next")
				t.Logf("report:\n%s", summary)
			}
		})
	}
}
