package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"runtime/debug"
	"sync"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"
)

// Parallel callbacks for bbolt (opt in with WithParallelCallbacks).
//
// In the default mode a group commit (bolt_group.go) runs its members'
// callbacks one after the other on the shared writable transaction, so a
// callback that does filesystem work holds up every writer behind it. In
// parallel mode a writable WithTransaction callback runs first on its own
// optimistic transaction (optTx), side by side with the others':
//
//   - reads go to a bbolt read transaction (a snapshot of the last commit
//     that returned), which is closed as soon as the callback returns (a
//     bbolt writer that grows the file waits for every reader);
//   - writes go to an overlay (the records by name, nil for a removed one,
//     and the parent links) and an ordered log of the writes, and reads
//     see them;
//   - every name read (present or absent) and every parent whose children
//     were checked is remembered (the read set); a whole-store operation
//     (scan, scanLinks, idLimit, raiseIDs) promotes the member in place to
//     the serial path (see optTx);
//   - IDs come from one in-memory allocator of the engine, which every
//     writer of the store uses in this mode, so no two transactions ever
//     draw the same ID; an ID drawn by an attempt that applies nothing is
//     skipped, never handed out again.
//
// A callback that fails, or succeeds without writing, applies nothing: it
// is serializable at its snapshot, which is durable, and returns at once.
// A callback that wrote joins the group commit. There, with the group's
// lock held, it is validated: it is valid when no write applied after its
// snapshot (by an earlier member of the still-open group, a group
// committed since, or a TransactionContext transaction) touched a name it
// read or wrote, or the children of a parent it checked or linked. A valid
// member's writes are replayed, in order, on the shared transaction through
// the ordinary boltTx calls (the encoding is written once). An invalid
// member, or one marked for the serial path, runs its callback again, on the
// shared transaction, exactly as in the default mode: so it gets the answer
// a serial store gives (two creates of one name: one success, one
// AlreadyExists), never a conflict, and a callback runs at most twice.
//
// Validation uses a log of the write sets applied, numbered in order; a
// bbolt writer logs its write set before its commit. A snapshot records
// the number of the last write set of a commit that had returned (durable)
// before it begins its read transaction, so it has seen at least those
// writes: validating against every write set numbered after it may find a
// write the snapshot saw (the member then runs again, needlessly) but never
// misses one it did not see. (A snapshot may thus see a commit whose fsync
// is still under way, as any bbolt reader may: bbolt shows the new meta
// page as soon as it is written. A member that applies nothing therefore
// waits, before it returns, for the commit that was under way when its
// snapshot began: an answer never rests on writes that are not durable.)
// TransactionContext transactions stay ordinary bbolt transactions; in this
// mode they log their write sets too, and draw IDs from the allocator.

// boltParallel is the engine's state for parallel callbacks.
type boltParallel struct {
	// ids is the highest ID handed out; seeded at open from the
	// snapshots bucket's sequence.
	ids atomic.Uint64

	mu      sync.Mutex
	seq     uint64 // number of the last write set logged
	durable uint64 // number of the last write set of a commit that returned
	// committing is the number of the last write set of the last commit
	// begun; a snapshot may see up to it.
	committing uint64
	// durableCond is signalled (with mu) when durable grows.
	durableCond *sync.Cond
	log         []loggedWrites  // write sets a snapshot may not have seen, in order
	active      map[*optTx]bool // optimistic members not yet validated
}

type loggedWrites struct {
	seq uint64
	ws  *writeSet
}

// writeSet is what one transaction wrote: names of records put or
// removed, IDs of parents whose links changed.
type writeSet struct {
	names   map[string]struct{}
	parents map[uint64]struct{}
}

func (w *writeSet) addName(name string) {
	if w == nil {
		return
	}
	if w.names == nil {
		w.names = map[string]struct{}{}
	}
	w.names[name] = struct{}{}
}

func (w *writeSet) addParent(id uint64) {
	if w == nil {
		return
	}
	if w.parents == nil {
		w.parents = map[uint64]struct{}{}
	}
	w.parents[id] = struct{}{}
}

func (w *writeSet) empty() bool { return w == nil || (len(w.names) == 0 && len(w.parents) == 0) }

// nextID hands out the next ID, or ErrIDsExhausted after 2^64-1.
func (p *boltParallel) nextID() (uint64, error) {
	for {
		cur := p.ids.Load()
		if cur == math.MaxUint64 {
			return 0, ErrIDsExhausted
		}
		if p.ids.CompareAndSwap(cur, cur+1) {
			return cur + 1, nil
		}
	}
}

// raise makes sure nextID never returns id or below.
func (p *boltParallel) raise(id uint64) {
	for {
		cur := p.ids.Load()
		if cur >= id || p.ids.CompareAndSwap(cur, id) {
			return
		}
	}
}

// logWrites numbers ws and logs it; called by the bbolt writer of the
// moment, before its commit. Entries no snapshot needs are dropped.
func (p *boltParallel) logWrites(ws *writeSet) {
	if ws.empty() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seq++
	p.log = append(p.log, loggedWrites{p.seq, ws})
	oldest := p.durable
	for o := range p.active {
		oldest = min(oldest, o.snapSeq)
	}
	drop := 0
	for drop < len(p.log) && p.log[drop].seq <= oldest {
		drop++
	}
	if drop > 0 {
		p.log = append(p.log[:0], p.log[drop:]...)
	}
}

// lastSeq is the number of the last write set logged.
func (p *boltParallel) lastSeq() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seq
}

// committed records that the write sets up to upto are committed (or were
// rolled back: either way a new snapshot shows what they did).
func (p *boltParallel) committed(upto uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.durable = max(p.durable, upto)
	if p.durableCond != nil {
		p.durableCond.Broadcast()
	}
}

// committingUpTo records that a commit of the write sets up to upto
// begins: snapshots begun from now on may see them.
func (p *boltParallel) committingUpTo(upto uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.committing = max(p.committing, upto)
}

// waitDurable waits until the commits of the write sets up to seq have
// returned.
func (p *boltParallel) waitDurable(seq uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.durableCond == nil {
		p.durableCond = sync.NewCond(&p.mu)
	}
	for p.durable < seq {
		p.durableCond.Wait()
	}
}

// release forgets an optimistic member that will not be validated.
func (p *boltParallel) release(o *optTx) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.active, o)
}

// validate reports whether no write set logged after o's snapshot meets
// o's reads and writes, and forgets o.
func (p *boltParallel) validate(o *optTx) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.active, o)
	for i := len(p.log) - 1; i >= 0 && p.log[i].seq > o.snapSeq; i-- {
		if o.readAll {
			return false
		}
		ws := p.log[i].ws
		for name := range ws.names {
			if _, ok := o.reads[name]; ok {
				return false
			}
		}
		for id := range ws.parents {
			if _, ok := o.childReads[id]; ok {
				return false
			}
		}
	}
	return true
}

// commitParallel commits b's bbolt transaction in parallel mode: its write
// set (if not logged yet) is logged first, and the write sets logged so
// far (all of this writer's: bbolt has one writer at a time) count as
// durable once the commit returned.
func (b *boltTx) commitParallel(commit func() error) error {
	p := b.eng.par
	p.logWrites(b.ws)
	b.ws = nil
	upto := p.lastSeq()
	p.committingUpTo(upto)
	defer p.committed(upto)
	return commit()
}

// seedIDs sets the allocator from the snapshots bucket's sequence.
func (e *boltEngine) seedIDs() error {
	return e.guarded(nil, func() error {
		return boltErr(e.db.View(func(tx *bolt.Tx) error {
			if v := tx.Bucket(bKeyVersion); v != nil {
				if s := v.Bucket(bKeySnapshots); s != nil {
					e.par.raise(s.Sequence())
				}
			}
			return nil
		}))
	})
}

// optOp is one write of an optimistic transaction, replayed at apply.
type optOp struct {
	kind          optOpKind
	name          string
	r             *record
	parent, child ref
}

type optOpKind int

const (
	opPut optOpKind = iota
	opDelete
	opLink
	opUnlink
)

// membership is a member's place in a group commit (joinGroup).
type membership struct {
	bt    *boltTx
	gc    *groupCommit
	first bool
}

// restartSerially is the panic value with which an optimistic callback is
// abandoned when it must run again serially in the middle (see promote);
// runParallel recognises it.
type restartSerially struct{}

// optTx is the optimistic transaction of a parallel callback.
//
// A whole-store operation (scan, scanLinks, idLimit, raiseIDs: a walk must
// see the transaction's own writes in order, and an ID limit is the
// store's) promotes it in place: the member joins the group commit, is
// validated, has its writes so far applied to the shared transaction, and
// goes on there, serially, as in the default mode. When the validation
// fails the callback cannot go on: it is abandoned with a panic
// (restartSerially) that unwinds it, and runs again on the shared
// transaction.
type optTx struct {
	eng     *boltEngine
	snap    *boltTx // read-only: the snapshot
	snapSeq uint64
	// maySee is the number up to which the snapshot may hold writes
	// (commits under way when it began): a member that applies nothing
	// waits for them to be durable.
	maySee uint64

	mu         sync.Mutex
	closed     bool
	overlay    map[string]*record         // written records; nil: removed
	links      map[uint64]map[uint64]bool // parent ID -> child ID -> linked (false: unlinked)
	ops        []optOp                    // the writes, in order
	reads      map[string]struct{}        // names read or written
	childReads map[uint64]struct{}        // parents whose children were checked
	readAll    bool                       // a nested reader read the whole snapshot
	maxID      uint64                     // highest ID drawn

	// joined is set once the member joined the group in the middle of its
	// callback; promoted says it goes on there (else it restarts).
	joined   *membership
	promoted bool
	// applyErr is why applying the writes at promotion failed: the
	// member's share then fails however the callback ends.
	applyErr error
}

// beginOptimistic starts an optimistic transaction on a snapshot that
// holds at least every commit that returned.
func (e *boltEngine) beginOptimistic() (*optTx, error) {
	if err := e.writeRefusal(); err != nil {
		return nil, err
	}
	p := e.par
	o := &optTx{eng: e, reads: map[string]struct{}{}, childReads: map[uint64]struct{}{}}
	// The number first, then the read transaction: it sees at least
	// what the number says (see the top of this file).
	p.mu.Lock()
	o.snapSeq = p.durable
	o.maySee = max(p.durable, p.committing)
	if p.active == nil {
		p.active = map[*optTx]bool{}
	}
	p.active[o] = true
	p.mu.Unlock()
	var tx *bolt.Tx
	err := e.guarded(nil, func() (err error) {
		tx, err = e.db.Begin(false)
		return boltErr(err)
	})
	if err == nil {
		o.snap, err = e.newBoltTx(tx)
	}
	if err != nil {
		p.release(o)
		return nil, err
	}
	return o, nil
}

// closeSnapshot ends the read transaction. Called with mu held.
func (o *optTx) closeSnapshot() {
	if o.snap != nil {
		_ = o.snap.rollback()
		o.snap = nil
	}
}

// close ends the transaction; later uses fail with ErrTransactionDone.
func (o *optTx) close() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closed = true
	o.closeSnapshot()
}

// enter locks o for an operation and says where it goes: shared is the
// group's transaction once o is promoted (mu is then released), nil while
// o runs on its snapshot (mu held; the caller unlocks).
func (o *optTx) enter() (shared *boltTx, err error) {
	o.mu.Lock()
	if o.closed || (o.joined != nil && !o.promoted) {
		// Ended, or abandoned at promotion (a callback that recovered
		// restartSerially goes on without a transaction).
		o.mu.Unlock()
		return nil, ErrTransactionDone
	}
	if o.promoted {
		bt := o.joined.bt
		o.mu.Unlock()
		return bt, nil
	}
	return nil, nil
}

// promote moves o to the group's shared transaction (see optTx), or
// abandons the callback with restartSerially. Called with mu held; it is
// released.
func (o *optTx) promote() (*boltTx, error) {
	defer o.mu.Unlock()
	e := o.eng
	// A writer of the shared transaction that grows the file waits for
	// every reader: the snapshot goes first.
	o.closeSnapshot()
	bt, gc, first, err := e.joinGroup()
	if err != nil {
		e.par.release(o)
		o.closed = true
		return nil, err
	}
	o.joined = &membership{bt, gc, first}
	if !e.par.validate(o) {
		panic(restartSerially{})
	}
	o.promoted = true
	if err := o.apply(bt); err != nil {
		o.applyErr = err
		return nil, err
	}
	return bt, nil
}

func copyRecord(r *record) *record {
	if r == nil {
		return nil
	}
	c := *r
	return &c
}

func (o *optTx) get(ctx context.Context, name string) (*record, error) {
	shared, err := o.enter()
	if shared != nil || err != nil {
		if err != nil {
			return nil, err
		}
		return shared.get(ctx, name)
	}
	defer o.mu.Unlock()
	if r, ok := o.overlay[name]; ok {
		return copyRecord(r), nil
	}
	o.reads[name] = struct{}{}
	return o.snap.get(ctx, name)
}

func (o *optTx) getMany(ctx context.Context, names lookupNames) (out [maxLookup]*record, err error) {
	shared, err := o.enter()
	if shared != nil || err != nil {
		if err != nil {
			return out, err
		}
		return shared.getMany(ctx, names)
	}
	defer o.mu.Unlock()
	var fromSnap lookupNames
	for i, name := range names {
		if name == "" {
			continue
		}
		if r, ok := o.overlay[name]; ok {
			out[i] = copyRecord(r)
			continue
		}
		o.reads[name] = struct{}{}
		fromSnap[i] = name
	}
	got, err := o.snap.getMany(ctx, fromSnap)
	if err != nil {
		return out, err
	}
	for i, name := range fromSnap {
		if name != "" {
			out[i] = got[i]
		}
	}
	return out, nil
}

// write records one write; a record's name joins the read set too (a
// blind write is validated as a read).
func (o *optTx) write(op optOp) error {
	shared, err := o.enter()
	if shared != nil || err != nil {
		if err != nil {
			return err
		}
		return applyOp(shared, op)
	}
	defer o.mu.Unlock()
	if err := o.eng.writeRefusal(); err != nil {
		return err
	}
	switch op.kind {
	case opPut, opDelete:
		if o.overlay == nil {
			o.overlay = map[string]*record{}
		}
		o.overlay[op.name] = copyRecord(op.r)
		o.reads[op.name] = struct{}{}
		op.r = copyRecord(op.r)
	case opLink, opUnlink:
		if o.links == nil {
			o.links = map[uint64]map[uint64]bool{}
		}
		if o.links[op.parent.id] == nil {
			o.links[op.parent.id] = map[uint64]bool{}
		}
		// A link is keyed by its child's ID, which only this
		// transaction holds (or has read by name): links of other
		// children of the same parent do not conflict with it.
		o.links[op.parent.id][op.child.id] = op.kind == opLink
	}
	o.ops = append(o.ops, op)
	return nil
}

func applyOp(bt *boltTx, op optOp) error {
	switch op.kind {
	case opPut:
		return bt.put(op.name, op.r)
	case opDelete:
		return bt.delete(op.name)
	case opLink:
		return bt.link(op.parent, op.child)
	default:
		return bt.unlink(op.parent, op.child)
	}
}

func (o *optTx) put(name string, r *record) error {
	return o.write(optOp{kind: opPut, name: name, r: r})
}

func (o *optTx) delete(name string) error { return o.write(optOp{kind: opDelete, name: name}) }

func (o *optTx) link(parent, child ref) error {
	return o.write(optOp{kind: opLink, parent: parent, child: child})
}

func (o *optTx) unlink(parent, child ref) error {
	return o.write(optOp{kind: opUnlink, parent: parent, child: child})
}

func (o *optTx) hasChildren(ctx context.Context, p ref) (bool, error) {
	shared, err := o.enter()
	if shared != nil || err != nil {
		if err != nil {
			return false, err
		}
		return shared.hasChildren(ctx, p)
	}
	defer o.mu.Unlock()
	o.childReads[p.id] = struct{}{}
	changed := o.links[p.id]
	for _, linked := range changed {
		if linked {
			return true, nil
		}
	}
	return o.snap.hasChildrenBut(p.id, changed)
}

// hasChildrenBut reports whether parent has an index entry for a child
// not among except.
func (b *boltTx) hasChildrenBut(parent uint64, except map[uint64]bool) (_ bool, err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if pb, err := b.parentsBucket(); pb == nil {
		return false, err
	}
	prefix := parentLinkPrefix(parent)
	c := b.parents.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		_, child, ok := decodeParentLinkKey(k)
		if _, gone := except[child]; !ok || !gone {
			return true, nil
		}
	}
	return false, nil
}

func (o *optTx) willCheckChildren(string) {}

func (o *optTx) maxName() int { return bolt.MaxKeySize }

// serially returns the shared transaction, promoting o first if needed.
func (o *optTx) serially() (*boltTx, error) {
	shared, err := o.enter()
	if shared != nil || err != nil {
		return shared, err
	}
	return o.promote()
}

func (o *optTx) scan(ctx context.Context, fn func(string, *record, error) error) error {
	bt, err := o.serially()
	if err != nil {
		return err
	}
	return bt.scan(ctx, fn)
}

func (o *optTx) scanLinks(ctx context.Context, fn func(ref, ref, error) error) error {
	bt, err := o.serially()
	if err != nil {
		return err
	}
	return bt.scanLinks(ctx, fn)
}

func (o *optTx) readRecords(ctx context.Context, names []string, fn func(int, *record, error)) error {
	bt, err := o.serially()
	if err != nil {
		return err
	}
	return bt.readRecords(ctx, names, fn)
}

func (o *optTx) indexedParent(name string, id uint64) ref {
	return boltIndexedParent(name, id)
}

func (o *optTx) readLinks(ctx context.Context, links []link, fn func(int, ref, string, bool)) error {
	bt, err := o.serially()
	if err != nil {
		return err
	}
	return bt.readLinks(ctx, links, fn)
}

func (o *optTx) idLimit(ctx context.Context) (uint64, error) {
	bt, err := o.serially()
	if err != nil {
		return 0, err
	}
	return bt.idLimit(ctx)
}

func (o *optTx) raiseIDs(ctx context.Context, id uint64) error {
	bt, err := o.serially()
	if err != nil {
		return err
	}
	return bt.raiseIDs(ctx, id)
}

func (o *optTx) layoutDamage() error {
	shared, err := o.enter()
	if shared != nil || err != nil {
		if err != nil {
			return err
		}
		return shared.layoutDamage()
	}
	defer o.mu.Unlock()
	return o.snap.layoutDamage()
}

func (o *optTx) nextID(ctx context.Context) (uint64, error) {
	shared, err := o.enter()
	if shared != nil || err != nil {
		if err != nil {
			return 0, err
		}
		return shared.nextID(ctx)
	}
	defer o.mu.Unlock()
	if err := o.eng.writeRefusal(); err != nil {
		return 0, err
	}
	id, err := o.eng.par.nextID()
	if err != nil {
		return 0, err
	}
	o.maxID = max(o.maxID, id)
	return id, nil
}

// commit is never called: the group commit applies an optimistic
// transaction (apply).
func (o *optTx) commit(context.Context) error {
	return errors.New("internal error: an optimistic transaction commits through its group")
}

func (o *optTx) rollback() error {
	o.close()
	return nil
}

// apply replays o's writes on bt, the group's shared transaction.
func (o *optTx) apply(bt *boltTx) error {
	if o.maxID > 0 {
		// The bucket's sequence covers every ID stored (Check's
		// invariant, and containerd's allocator if it opens the file).
		if err := bt.raiseIDs(context.Background(), o.maxID); err != nil {
			return err
		}
	}
	for _, op := range o.ops {
		if err := applyOp(bt, op); err != nil {
			return fmt.Errorf("applying the transaction: %w", err)
		}
	}
	return nil
}

// nestedReader is a read-only transaction begun inside o's callback (with
// its ctx). It reads o's snapshot, which is what a read-only transaction
// begun then sees, rather than begin a second bbolt read transaction on
// the same goroutine (which a writer growing the file would wait for,
// while it waits for the first: a deadlock). Its reads join o's read set;
// a whole-store read makes any commit since the snapshot invalidate o.
// Once o is promoted, it reads the shared transaction.
func (o *optTx) nestedReader() engineTx { return &optReader{o} }

type optReader struct{ o *optTx }

// use runs fn on the snapshot, or on the shared transaction once o is
// promoted.
func (r *optReader) use(fn func(bt *boltTx) error, note func(o *optTx)) error {
	o := r.o
	shared, err := o.enter()
	if err != nil {
		return err
	}
	if shared != nil {
		return fn(shared)
	}
	note(o)
	snap := o.snap
	o.mu.Unlock()
	return fn(snap)
}

func (r *optReader) get(ctx context.Context, name string) (rec *record, err error) {
	err = r.use(func(bt *boltTx) error {
		rec, err = bt.get(ctx, name)
		return err
	}, func(o *optTx) { o.reads[name] = struct{}{} })
	return rec, err
}

func (r *optReader) getMany(ctx context.Context, names lookupNames) (out [maxLookup]*record, err error) {
	err = r.use(func(bt *boltTx) error {
		out, err = bt.getMany(ctx, names)
		return err
	}, func(o *optTx) {
		for _, name := range names {
			if name != "" {
				o.reads[name] = struct{}{}
			}
		}
	})
	return out, err
}

func (r *optReader) hasChildren(ctx context.Context, p ref) (has bool, err error) {
	err = r.use(func(bt *boltTx) error {
		has, err = bt.hasChildren(ctx, p)
		return err
	}, func(o *optTx) { o.childReads[p.id] = struct{}{} })
	return has, err
}

func readsAll(o *optTx) { o.readAll = true }

func (r *optReader) scan(ctx context.Context, fn func(string, *record, error) error) error {
	return r.use(func(bt *boltTx) error { return bt.scan(ctx, fn) }, readsAll)
}

func (r *optReader) scanLinks(ctx context.Context, fn func(ref, ref, error) error) error {
	return r.use(func(bt *boltTx) error { return bt.scanLinks(ctx, fn) }, readsAll)
}

func (r *optReader) readRecords(ctx context.Context, names []string, fn func(int, *record, error)) error {
	return r.use(func(bt *boltTx) error { return bt.readRecords(ctx, names, fn) }, readsAll)
}

func (r *optReader) indexedParent(name string, id uint64) ref {
	return boltIndexedParent(name, id)
}

func (r *optReader) readLinks(ctx context.Context, links []link, fn func(int, ref, string, bool)) error {
	return r.use(func(bt *boltTx) error { return bt.readLinks(ctx, links, fn) }, readsAll)
}

func (r *optReader) idLimit(ctx context.Context) (limit uint64, err error) {
	err = r.use(func(bt *boltTx) error {
		limit, err = bt.idLimit(ctx)
		return err
	}, readsAll)
	return limit, err
}

func (r *optReader) layoutDamage() error {
	return r.use(func(bt *boltTx) error { return bt.layoutDamage() }, func(*optTx) {})
}

func (r *optReader) willCheckChildren(string) {}
func (r *optReader) maxName() int             { return bolt.MaxKeySize }

func (r *optReader) put(string, *record) error              { return ErrReadOnly }
func (r *optReader) delete(string) error                    { return ErrReadOnly }
func (r *optReader) link(ref, ref) error                    { return ErrReadOnly }
func (r *optReader) unlink(ref, ref) error                  { return ErrReadOnly }
func (r *optReader) nextID(context.Context) (uint64, error) { return 0, ErrReadOnly }
func (r *optReader) raiseIDs(context.Context, uint64) error { return ErrReadOnly }
func (r *optReader) commit(context.Context) error           { return ErrReadOnly }
func (r *optReader) rollback() error                        { return nil } // the snapshot is o's

// runParallel runs m as a parallel member: optimistically on a snapshot,
// then, when it wrote, validated and applied (or run again serially) in a
// group commit. It returns when the member's writes are durable, or when
// it is known that they will not be applied.
func (e *boltEngine) runParallel(m groupMember) error {
	o, err := e.beginOptimistic()
	if err != nil {
		return fmt.Errorf("failed to start transaction: %w", err)
	}
	err = e.runOptimistic(m, o)
	var p *callbackPanic
	panicked := errors.As(err, &p)
	if o.promoted {
		// The member went on serially; runOptimistic settled its share.
		o.joined.gc.done.Wait()
		return groupOutcome(err, o.joined.gc)
	}
	if j := o.joined; j != nil {
		// Abandoned at promotion (restartSerially, or the callback
		// recovered that and returned): run again in the group joined.
		return e.finishMember(m, j.bt, j.gc, j.first)
	}
	if panicked {
		e.par.release(o)
		e.par.waitDurable(o.maySee)
		panic(p.value)
	}
	if err != nil || len(o.ops) == 0 {
		// Nothing to apply: serializable at the snapshot, once what
		// it may hold is durable.
		e.par.release(o)
		e.par.waitDurable(o.maySee)
		return err
	}
	bt, gc, first, err := e.joinGroup()
	if err != nil {
		e.par.release(o)
		return err
	}
	if e.par.validate(o) {
		err := o.apply(bt)
		e.group.settle(gc, bt, first, err == nil)
		gc.done.Wait()
		return groupOutcome(err, gc)
	}
	e.par.release(o)
	return e.finishMember(m, bt, gc, first)
}

// groupOutcome is what a member whose share ended with err returns once
// its group's commit gc is over; a panic goes on.
func groupOutcome(err error, gc *groupCommit) error {
	var p *callbackPanic
	if errors.As(err, &p) {
		panic(p.value)
	}
	if err != nil {
		return err
	}
	if gc.err != nil {
		return fmt.Errorf("commit failed: %w", gc.err)
	}
	return nil
}

// runOptimistic runs m on o and ends o however m ends: a panic comes
// back as a callbackPanic, and a runtime.Goexit goes on after o is
// forgotten. A member promoted during m has its share settled here (as
// runMember does); one abandoned at promotion is left to runParallel,
// unless the goroutine is exiting.
func (e *boltEngine) runOptimistic(m groupMember, o *optTx) (err error) {
	returned := false
	defer func() {
		o.close()
		j := o.joined
		switch {
		case j != nil && o.promoted:
			e.group.settle(j.gc, j.bt, j.first, returned && err == nil && o.applyErr == nil)
			if !returned {
				j.gc.done.Wait()
			}
			if returned && err == nil {
				err = o.applyErr
			}
		case j != nil && !returned:
			e.group.settle(j.gc, j.bt, j.first, false)
			j.gc.done.Wait()
		case !returned:
			e.par.release(o)
			e.par.waitDurable(o.maySee)
		}
	}()
	err = runGuarded(m, o)
	var p *callbackPanic
	if errors.As(err, &p) {
		if _, ok := p.value.(restartSerially); ok {
			err = nil
		}
	}
	returned = true
	return err
}

// boltOptions are the settings of NewBoltMetaStore beyond bbolt's own.
type boltOptions struct {
	parallel bool
}

// boltOptionsOf maps the *bolt.Options NewBoltMetaStore applies its
// BoltOpts to onto its own settings, for the BoltOpts of this package that
// change those (WithParallelCallbacks): BoltOpt keeps containerd's
// signature, func(*bolt.Options) error.
var boltOptionsOf sync.Map // *bolt.Options -> *boltOptions

// boltParallelDefault is the mode of a store opened without
// WithParallelCallbacks; tests set it to run everything in parallel mode.
var boltParallelDefault = false

// WithParallelCallbacks makes a bbolt store run the callbacks of
// concurrent writable WithTransaction calls side by side, each on a
// snapshot, with only the application of their writes serialised and
// fsyncs shared; a callback whose reads a concurrent commit changed runs
// again, serially, and gets the answer a serial store gives. So in this
// mode a writable WithTransaction callback may run twice (as on etcd),
// and IDs drawn by an attempt that applied nothing are skipped rather than
// handed out again (containerd's store reuses a rolled-back ID).
// TransactionContext transactions stay serial. See the README and
// bolt_parallel.go.
//
// It only has an effect when passed to NewBoltMetaStore: it is recognised
// by the *bolt.Options it is applied to, so applying it to other Options
// changes nothing.
func WithParallelCallbacks() BoltOpt {
	return func(o *bolt.Options) error {
		if s, ok := boltOptionsOf.Load(o); ok {
			s.(*boltOptions).parallel = true
		}
		return nil
	}
}
