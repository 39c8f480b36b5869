package storage_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// This file runs the etcd engine under faults: several clients run random
// transactions on a 3-member cluster while members are stopped and
// restarted (the leader, a follower, then two members at once, which loses
// the quorum). Afterwards the store must pass Check, hold every
// acknowledged transaction, and hold every failed transaction either
// entirely or not at all.
//
// How effects are verified. Transaction id of client c is "c<c>-<seq>", and
// it writes the label by<c>=<id> on every snapshot it touches (creates,
// commits, or whose parent it is). Snapshot names are "w<id>": unique, and
// only the client that made a snapshot removes or commits it. So every
// "slot" (the existence, kind and parent of a name; or one by<c> label of a
// name) has exactly one writing client, whose transactions are sequential,
// so the writes to a slot are totally ordered. The final value of a slot
// must then be the value of its last acknowledged write or of a failed one
// after it (a commit that fails with Unavailable may have been applied:
// README, "may or may not have been applied (all of it or none)"); which one
// it is tells, for each failed transaction, whether that slot shows it
// applied or not, and no failed transaction may show both. A refused or
// certainly aborted transaction never registers writes, so any trace of it
// is a value no slot allows. A label slot of a snapshot that no longer
// exists is not observable and is skipped.

const (
	fltClients        = 4
	fltRequestTimeout = 2 * time.Second
	fltCallTimeout    = 5 * time.Second
)

type fltStatus int

const (
	fltAcked     fltStatus = iota // returned nil: must be visible
	fltRefused                    // a refusal (NotFound, ...): nothing applied
	fltAborted                    // failed before Commit, or gave up on conflicts: nothing applied
	fltAmbiguous                  // Commit failed with Unavailable or a deadline: all or nothing
)

func (s fltStatus) String() string {
	return [...]string{"acknowledged", "refused", "aborted", "ambiguous"}[s]
}

// fltSlot is the existence (label "") or one label of a snapshot name.
type fltSlot struct{ name, label string }

func (s fltSlot) String() string {
	if s.label == "" {
		return s.name
	}
	return s.name + "." + s.label
}

// fltWrite is what a transaction writes to a slot: "absent", "<Kind>|<parent>"
// or a label value.
type fltWrite struct {
	slot fltSlot
	val  string
}

// fltTx is one transaction of the workload and its outcome.
type fltTx struct {
	id        string
	client    int
	desc      string
	writes    []fltWrite
	status    fltStatus
	err       error
	class     string
	phase     string
	attempts  int // callback runs: more than one after conflicts
	call, ret time.Duration
}

// fltPhases records the fault schedule; operations are attributed to the
// phase in which they were called.
type fltPhases struct {
	start time.Time
	mu    sync.Mutex
	name  string
	log   []string
}

func (p *fltPhases) now() time.Duration { return time.Since(p.start) }

func (p *fltPhases) set(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.name = name
	p.log = append(p.log, fmt.Sprintf("%6.2fs %s", p.now().Seconds(), name))
}

func (p *fltPhases) current() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.name
}

// fltShared is what every client knows: the acknowledged committed
// snapshots of all clients, to build on and to label.
type fltShared struct {
	mu        sync.Mutex
	committed map[string]string // name -> parent
}

func (s *fltShared) pick(rng *rand.Rand) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.committed) == 0 {
		return ""
	}
	names := slices.Sorted(maps.Keys(s.committed))
	return names[rng.IntN(len(names))]
}

func (s *fltShared) set(name, parent string, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok {
		s.committed[name] = parent
	} else {
		delete(s.committed, name)
	}
}

// fltClient is one client: its store, and what it knows of its own
// snapshots (acknowledged only; a snapshot touched by an ambiguous
// transaction is never used again).
type fltClient struct {
	n         int
	ms        storage.MetaStore
	rng       *rand.Rand
	shared    *fltShared
	actives   map[string]string // name -> parent
	committed map[string]string
	seq       int
	txs       []*fltTx
}

func (c *fltClient) label() string { return fmt.Sprintf("by%d", c.n) }

func (c *fltClient) own() []string {
	return slices.Sorted(func(yield func(string) bool) {
		for n := range c.actives {
			if !yield(n) {
				return
			}
		}
		for n := range c.committed {
			if !yield(n) {
				return
			}
		}
	})
}

// fltOp is a transaction ready to run: its callback, and what to learn when
// it is acknowledged or ambiguous.
type fltOp struct {
	tx          *fltTx
	fn          func(ctx context.Context) error
	onAck       func()
	onAmbiguous func()
}

// next draws the client's next transaction.
func (c *fltClient) next() fltOp {
	c.seq++
	id := fmt.Sprintf("c%d-%d", c.n, c.seq)
	key := c.label()
	labels := snapshots.WithLabels(map[string]string{key: id})
	tx := &fltTx{id: id, client: c.n}
	touch := func(ctx context.Context, name string) error {
		if name == "" {
			return nil
		}
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: map[string]string{key: id}}, "labels."+key)
		return err
	}
	write := func(name, label, val string) {
		if name != "" {
			tx.writes = append(tx.writes, fltWrite{fltSlot{name, label}, val})
		}
	}
	parent := func() string {
		if c.rng.IntN(5) == 0 {
			return ""
		}
		return c.shared.pick(c.rng)
	}
	own := c.own()
	n := c.rng.IntN(100)
	if len(own) > 12 && c.rng.IntN(10) < 7 {
		n = 60 // keep the store small: mostly remove
	}
	name := "w" + id
	switch {
	case n < 25 || (n < 60 && len(c.actives) == 0 && n >= 45):
		p := parent()
		tx.desc = fmt.Sprintf("layer %s on %q", name, p)
		write(name, "", "Committed|"+p)
		write(name, key, id)
		write(p, key, id)
		return fltOp{tx: tx,
			fn: func(ctx context.Context) error {
				if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name+"-tmp", p, labels); err != nil {
					return err
				}
				if _, err := storage.CommitActive(ctx, name+"-tmp", name, snapshots.Usage{Size: 1}, labels); err != nil {
					return err
				}
				return touch(ctx, p)
			},
			onAck: func() { c.committed[name] = p; c.shared.set(name, p, true) },
		}
	case n < 45:
		p := parent()
		tx.desc = fmt.Sprintf("prepare %s on %q", name, p)
		write(name, "", "Active|"+p)
		write(name, key, id)
		write(p, key, id)
		return fltOp{tx: tx,
			fn: func(ctx context.Context) error {
				if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, p, labels); err != nil {
					return err
				}
				return touch(ctx, p)
			},
			onAck: func() { c.actives[name] = p },
		}
	case n < 60:
		actives := slices.Sorted(maps.Keys(c.actives))
		k := actives[c.rng.IntN(len(actives))]
		p := c.actives[k]
		tx.desc = fmt.Sprintf("commit %s as %s (parent %q)", k, name, p)
		write(k, "", "absent")
		write(name, "", "Committed|"+p)
		write(name, key, id)
		write(p, key, id)
		return fltOp{tx: tx,
			fn: func(ctx context.Context) error {
				if _, err := storage.CommitActive(ctx, k, name, snapshots.Usage{Size: 2}, labels); err != nil {
					return err
				}
				return touch(ctx, p)
			},
			onAck:       func() { delete(c.actives, k); c.committed[name] = p; c.shared.set(name, p, true) },
			onAmbiguous: func() { delete(c.actives, k) },
		}
	case n < 80 && len(own) > 0:
		x := own[c.rng.IntN(len(own))]
		p, active := c.actives[x]
		if !active {
			p = c.committed[x]
		}
		tx.desc = fmt.Sprintf("remove %s (parent %q)", x, p)
		write(x, "", "absent")
		write(p, key, id)
		forget := func() { delete(c.actives, x); delete(c.committed, x); c.shared.set(x, "", false) }
		return fltOp{tx: tx,
			fn: func(ctx context.Context) error {
				if _, _, err := storage.Remove(ctx, x); err != nil {
					return err
				}
				return touch(ctx, p)
			},
			onAck:       forget,
			onAmbiguous: forget,
		}
	}
	targets := map[string]bool{}
	for range 3 {
		if t := c.shared.pick(c.rng); t != "" {
			targets[t] = true
		}
	}
	if len(c.actives) > 0 {
		targets[slices.Sorted(maps.Keys(c.actives))[0]] = true
	}
	names := slices.Sorted(maps.Keys(targets))
	tx.desc = fmt.Sprintf("label %v", names)
	for _, t := range names {
		write(t, key, id)
	}
	return fltOp{tx: tx, fn: func(ctx context.Context) error {
		for _, t := range names {
			if err := touch(ctx, t); err != nil {
				return err
			}
		}
		return nil
	}}
}

// run runs op in WithTransaction with a deadline and records its outcome.
func (c *fltClient) run(op fltOp, phases *fltPhases) {
	tx := op.tx
	tx.phase = phases.current()
	ctx, cancel := context.WithTimeout(context.Background(), fltCallTimeout)
	defer cancel()
	reachedCommit := false
	tx.call = phases.now()
	tx.err = c.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		reachedCommit = false
		tx.attempts++
		err := op.fn(ctx)
		reachedCommit = err == nil
		return err
	})
	tx.ret = phases.now()
	tx.class = linErrClass(tx.err)
	switch {
	case tx.err == nil:
		tx.status = fltAcked
	case linIsRefusal(tx.class) && !reachedCommit:
		tx.status = fltRefused
	case tx.class == "Conflict", !reachedCommit && (tx.class == "Unavailable" || tx.class == "DeadlineExceeded"):
		tx.status = fltAborted
	default:
		// A failed Commit (Unavailable, deadline) or an unexpected error
		// (reported by the test): it may have been applied.
		tx.status = fltAmbiguous
	}
	c.txs = append(c.txs, tx)
	switch tx.status {
	case fltAcked:
		if op.onAck != nil {
			op.onAck()
		}
	case fltAmbiguous:
		if op.onAmbiguous != nil {
			op.onAmbiguous()
		}
	}
}

// fltVerify checks the final state of the store against the transactions
// of every client (each client's in the order it ran them) and returns
// every violation, and how the ambiguous transactions were resolved.
func fltVerify(clients [][]*fltTx, final map[string]snapshots.Info) (violations []string, resolved map[string]int) {
	byID := map[string]*fltTx{}
	type slotOp struct {
		tx  *fltTx
		val string
	}
	hist := map[fltSlot][]slotOp{}
	for _, txs := range clients {
		for _, tx := range txs {
			byID[tx.id] = tx
			if tx.status != fltAcked && tx.status != fltAmbiguous {
				continue
			}
			for _, w := range tx.writes {
				hist[w.slot] = append(hist[w.slot], slotOp{tx, w.val})
			}
		}
	}
	slots := map[fltSlot]bool{}
	for s := range hist {
		slots[s] = true
	}
	for name, info := range final {
		slots[fltSlot{name: name}] = true
		for k := range info.Labels {
			slots[fltSlot{name, k}] = true
		}
	}
	applied, notApplied := map[*fltTx][]fltSlot{}, map[*fltTx][]fltSlot{}
	for _, s := range slices.SortedFunc(maps.Keys(slots), func(a, b fltSlot) int { return strings.Compare(a.String(), b.String()) }) {
		info, exists := final[s.name]
		initial, v := "", ""
		switch {
		case s.label == "":
			initial, v = "absent", "absent"
			if exists {
				v = info.Kind.String() + "|" + info.Parent
			}
		case !exists:
			continue // the label of a snapshot that is gone: not observable
		default:
			v = info.Labels[s.label]
		}
		ops := hist[s]
		last := -1
		for i, o := range ops {
			if o.tx.status == fltAcked {
				last = i
			}
		}
		var matches []int
		if last < 0 && v == initial {
			matches = append(matches, -1)
		}
		for i := max(last, 0); i < len(ops); i++ {
			if ops[i].val == v {
				matches = append(matches, i)
			}
		}
		if len(matches) == 0 {
			var b strings.Builder
			fmt.Fprintf(&b, "%s is %q", s, v)
			if w, ok := byID[v]; ok && s.label != "" {
				fmt.Fprintf(&b, " (written by %s %s, which was %s: %v)", w.id, w.desc, w.status, w.err)
			}
			if last >= 0 {
				fmt.Fprintf(&b, "; the last acknowledged write was %q by %s %s", ops[last].val, ops[last].tx.id, ops[last].tx.desc)
			} else {
				fmt.Fprintf(&b, "; no acknowledged write, initially %q", initial)
			}
			for _, o := range ops[max(last+1, 0):] {
				fmt.Fprintf(&b, "; then %q by %s %s (%s: %v)", o.val, o.tx.id, o.tx.desc, o.tx.status, o.tx.err)
			}
			violations = append(violations, b.String())
			continue
		}
		if len(matches) > 1 {
			continue // the value does not tell which write it is
		}
		j := matches[0]
		if j >= 0 && ops[j].tx.status == fltAmbiguous {
			applied[ops[j].tx] = append(applied[ops[j].tx], s)
		}
		for _, o := range ops[j+1:] {
			notApplied[o.tx] = append(notApplied[o.tx], s)
		}
	}
	resolved = map[string]int{}
	for _, txs := range clients {
		for _, tx := range txs {
			if tx.status != fltAmbiguous {
				continue
			}
			a, n := applied[tx], notApplied[tx]
			switch {
			case len(a) > 0 && len(n) > 0:
				violations = append(violations, fmt.Sprintf("%s %s failed (%v) and is partly applied: visible in %v, not in %v", tx.id, tx.desc, tx.err, a, n))
			case len(a) > 0:
				resolved["applied"]++
			case len(n) > 0:
				resolved["not applied"]++
			default:
				resolved["not observable"]++
			}
		}
	}
	return violations, resolved
}

// fltReadAll returns every snapshot of ms, retrying while the cluster
// recovers.
func fltReadAll(t *testing.T, ms storage.MetaStore) map[string]snapshots.Info {
	t.Helper()
	var final map[string]snapshots.Info
	var err error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		final = map[string]snapshots.Info{}
		err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
				final[info.Name] = info
				return nil
			})
		})
		if err == nil {
			return final
		}
	}
	require.NoError(t, err, "reading the final state")
	return nil
}

// TestEtcdUnderFaults: leader down, follower down, quorum lost; see the
// top of this file.
func TestEtcdUnderFaults(t *testing.T) {
	seed := linSeed(t)
	c := etcdtest.StartCluster(t, 3)
	const root = "faults"
	shared := &fltShared{committed: map[string]string{}}
	clients := make([]*fltClient, fltClients)
	for i := range clients {
		cfg := c.ClientConfig()
		ms, err := storage.NewEtcdStore(root, &cfg, storage.WithRequestTimeout(fltRequestTimeout))
		require.NoError(t, err)
		t.Cleanup(func() { _ = ms.Close() })
		clients[i] = &fltClient{n: i, ms: ms, rng: rand.New(rand.NewPCG(seed, uint64(i))), shared: shared,
			actives: map[string]string{}, committed: map[string]string{}}
	}

	phases := &fltPhases{start: time.Now()}
	phases.set("healthy")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopClients := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopClients() // also when a require below ends the test early
	for _, cl := range clients {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				cl.run(cl.next(), phases)
				if last := cl.txs[len(cl.txs)-1]; last.status == fltAborted || last.status == fltAmbiguous {
					time.Sleep(20 * time.Millisecond) // no busy loop against a dead endpoint
				}
			}
		})
	}

	waitLeader := func() int {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		l, err := c.WaitLeader(ctx)
		require.NoError(t, err)
		return l
	}
	follower := func(not ...int) int {
		l := waitLeader()
		for i := range c.N() {
			if i != l && !slices.Contains(not, i) {
				return i
			}
		}
		panic("no follower")
	}
	restart := func(i int) {
		t.Helper()
		require.NoError(t, c.Restart(i))
	}

	time.Sleep(3 * time.Second)
	leader := waitLeader()
	phases.set(fmt.Sprintf("leader m%d down", leader))
	c.Stop(leader)
	time.Sleep(3 * time.Second)
	phases.set(fmt.Sprintf("leader m%d restarting", leader))
	restart(leader)
	waitLeader()
	phases.set("healthy again")
	time.Sleep(2 * time.Second)

	f := follower()
	phases.set(fmt.Sprintf("follower m%d down", f))
	c.Stop(f)
	time.Sleep(3 * time.Second)
	phases.set(fmt.Sprintf("follower m%d restarting", f))
	restart(f)
	waitLeader()
	phases.set("healthy again")
	time.Sleep(2 * time.Second)

	f1 := follower()
	f2 := follower(f1)
	phases.set(fmt.Sprintf("stopping m%d and m%d", f1, f2))
	c.Stop(f1)
	c.Stop(f2)
	phases.set("quorum lost")
	quorumLost := phases.now()
	time.Sleep(5 * time.Second)
	quorumBack := phases.now()
	phases.set(fmt.Sprintf("m%d and m%d restarting", f1, f2))
	restart(f1)
	restart(f2)
	waitLeader()
	phases.set("quorum back")
	resumed := phases.now()
	time.Sleep(6 * time.Second)
	phases.set("stopping clients")
	stopClients()
	t.Logf("schedule:\n%s", strings.Join(phases.log, "\n"))

	// What happened in each phase.
	all := make([][]*fltTx, len(clients))
	perPhase := map[string]map[string]int{}
	var order []string
	for i, cl := range clients {
		all[i] = cl.txs
		for _, tx := range cl.txs {
			if perPhase[tx.phase] == nil {
				perPhase[tx.phase] = map[string]int{}
			}
			perPhase[tx.phase][tx.class]++
			if tx.status == fltAmbiguous && tx.class != "Unavailable" && tx.class != "DeadlineExceeded" {
				t.Errorf("%s %s: unexpected error: %v", tx.id, tx.desc, tx.err)
			}
		}
	}
	for _, l := range phases.log {
		if name := strings.TrimSpace(l[8:]); perPhase[name] != nil && !slices.Contains(order, name) {
			order = append(order, name)
		}
	}
	for _, name := range order {
		t.Logf("%-24s %v", name, perPhase[name])
	}

	// Without a quorum nothing succeeds, and failures are Unavailable or a
	// deadline; with the quorum back every client gets through again.
	inWindow := 0
	resumedBy := map[int]bool{}
	acked, retried := 0, 0
	var busy time.Duration
	var lat []time.Duration
	for _, cl := range clients {
		for _, tx := range cl.txs {
			if tx.status == fltAcked {
				acked++
			}
			if tx.attempts > 1 {
				retried++
			}
			if tx.status == fltAcked {
				busy += tx.ret - tx.call
				lat = append(lat, tx.ret-tx.call)
			}
			if tx.call >= quorumLost && tx.ret <= quorumBack {
				inWindow++
				assert.True(t, tx.class == "Unavailable" || tx.class == "DeadlineExceeded",
					"%s %s ran while the quorum was lost [%v, %v] and returned %s: %v", tx.id, tx.desc, tx.call, tx.ret, tx.class, tx.err)
			}
			if tx.call >= resumed && tx.status == fltAcked {
				resumedBy[cl.n] = true
			}
		}
	}
	assert.Positive(t, inWindow, "some transaction ran entirely while the quorum was lost")
	assert.Len(t, resumedBy, len(clients), "every client commits again once the quorum is back")
	assert.Greater(t, acked, 50, "the workload made progress")

	// The final state holds exactly the acknowledged work plus whole
	// failed transactions.
	cfg := c.ClientConfig()
	verifier, err := storage.NewEtcdStore(root, &cfg, storage.WithRequestTimeout(5*time.Second))
	require.NoError(t, err)
	t.Cleanup(func() { _ = verifier.Close() })
	final := fltReadAll(t, verifier)
	violations, resolved := fltVerify(all, final)
	total := 0
	for _, txs := range all {
		total += len(txs)
	}
	slices.Sort(lat)
	t.Logf("%d transactions ran again after a conflict; acknowledged ones took %v on average, median %v, p90 %v", retried, busy/time.Duration(max(1, acked)), lat[len(lat)/2], lat[len(lat)*9/10])
	t.Logf("%d transactions, %d acknowledged; %d snapshots at the end; ambiguous ones: %v", total, acked, len(final), resolved)
	for _, v := range violations {
		t.Errorf("atomicity/durability violation: %s", v)
	}
	linCheckStore(t, verifier)
}

// TestFaultVerifierDetectsViolations feeds fltVerify hand-made outcomes:
// it must catch a lost acknowledged write, a partly applied failed
// transaction and a trace of a refused one, and accept whole outcomes.
func TestFaultVerifierDetectsViolations(t *testing.T) {
	tx := func(id string, status fltStatus, writes ...fltWrite) *fltTx {
		return &fltTx{id: id, desc: "test", status: status, writes: writes}
	}
	w := func(name, label, val string) fltWrite { return fltWrite{fltSlot{name, label}, val} }
	committed := func(parent string, labels map[string]string) snapshots.Info {
		return snapshots.Info{Kind: snapshots.KindCommitted, Parent: parent, Labels: labels}
	}
	base := tx("c0-1", fltAcked, w("wc0-1", "", "Committed|"), w("wc0-1", "by0", "c0-1"))
	for _, tc := range []struct {
		name      string
		txs       []*fltTx
		final     map[string]snapshots.Info
		violation string
		resolved  map[string]int
	}{
		{"acknowledged write lost", []*fltTx{base}, map[string]snapshots.Info{}, "wc0-1 is \"absent\"", nil},
		{"acknowledged label lost", []*fltTx{base, tx("c0-2", fltAcked, w("wc0-1", "by0", "c0-2"))},
			map[string]snapshots.Info{"wc0-1": committed("", map[string]string{"by0": "c0-1"})}, "wc0-1.by0 is \"c0-1\"", nil},
		{"failed transaction partly applied", []*fltTx{base, tx("c0-2", fltAmbiguous,
			w("wc0-2", "", "Committed|wc0-1"), w("wc0-2", "by0", "c0-2"), w("wc0-1", "by0", "c0-2"))},
			map[string]snapshots.Info{"wc0-1": committed("", map[string]string{"by0": "c0-1"}),
				"wc0-2": committed("wc0-1", map[string]string{"by0": "c0-2"})}, "partly applied", nil},
		{"refused transaction visible", []*fltTx{base, tx("c0-2", fltRefused, w("wc0-1", "by0", "c0-2"))},
			map[string]snapshots.Info{"wc0-1": committed("", map[string]string{"by0": "c0-2"})}, "which was refused", nil},
		{"failed transaction applied whole", []*fltTx{base, tx("c0-2", fltAmbiguous,
			w("wc0-2", "", "Committed|wc0-1"), w("wc0-2", "by0", "c0-2"), w("wc0-1", "by0", "c0-2"))},
			map[string]snapshots.Info{"wc0-1": committed("", map[string]string{"by0": "c0-2"}),
				"wc0-2": committed("wc0-1", map[string]string{"by0": "c0-2"})}, "", map[string]int{"applied": 1}},
		{"failed transaction not applied", []*fltTx{base, tx("c0-2", fltAmbiguous,
			w("wc0-2", "", "Committed|wc0-1"), w("wc0-2", "by0", "c0-2"), w("wc0-1", "by0", "c0-2"))},
			map[string]snapshots.Info{"wc0-1": committed("", map[string]string{"by0": "c0-1"})}, "", map[string]int{"not applied": 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			violations, resolved := fltVerify([][]*fltTx{tc.txs}, tc.final)
			if tc.violation == "" {
				assert.Empty(t, violations)
				assert.Equal(t, tc.resolved, resolved)
				return
			}
			require.Len(t, violations, 1, "%v", violations)
			assert.Contains(t, violations[0], tc.violation)
		})
	}
}
