package storage

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"
)

// Group commit for bbolt.
//
// bbolt has one writer at a time and every commit costs an fsync, so
// writers queue behind one another's fsyncs. Concurrent writable
// WithTransaction calls instead share one bbolt transaction: each caller
// runs its own callback, in turn and on its own goroutine, on the open
// transaction; the last caller of a group, the one that finds nobody
// waiting, commits for all of them with one fsync. Every caller returns
// only after that commit, with its error (a caller whose callback failed
// also waits, since its callback may have read the group's earlier writes).
// A callback that fails (returns an error, panics, or ends its goroutine
// with runtime.Goexit) has its writes undone from an undo log before the
// next callback runs, so it affects no other caller, and no callback ever
// runs twice; a panic or Goexit then goes on on the caller's goroutine. A
// lone writer commits at once: there is no batching delay. When other
// writers are in flight, the last member yields the processor once before
// it decides that nobody is waiting, so that writers already runnable (the
// previous group's, returning to write again) join the group rather than
// start the next one: fewer, larger commits.

// maxGroupSize bounds how many callers share one commit, so that a steady
// stream of writers still commits regularly.
const maxGroupSize = 128

type boltGroup struct {
	mu      sync.Mutex   // held while one callback runs on the open transaction
	waiting atomic.Int32 // callers waiting for mu: the group is not complete
	// inFlight counts the callers of runInGroup that have not returned.
	inFlight atomic.Int32
	tx       *bolt.Tx // the open shared transaction, nil between groups
	commit   *groupCommit
	// commits and shares count the group commits made and the members'
	// shares they carried, for tests and benchmarks.
	commits, shares atomic.Int64
	// beforeCommit, set by tests only, runs before each group's commit,
	// after the group's lock is released.
	beforeCommit func()
}

// groupMemberTx is a group member's boltTx, and the commit of the group
// if the member begins one.
type groupMemberTx struct {
	boltTx
	began groupCommit
}

// groupCommit is the outcome of one shared commit.
type groupCommit struct {
	members int
	done    sync.WaitGroup // done once the commit is over
	err     error
}

// runInGroup runs m as one caller's share of a group commit and returns
// when that share is durable or has failed.
func (e *boltEngine) runInGroup(m groupMember) error {
	if e.par != nil {
		return e.runParallel(m)
	}
	e.group.inFlight.Add(1)
	defer e.group.inFlight.Add(-1)
	bt, gc, first, err := e.joinGroup()
	if err != nil {
		return err
	}
	return e.finishMember(m, bt, gc, first)
}

// joinGroup waits for the group's lock and returns, with it held, the
// shared transaction (begun if there is none), its commit, and whether
// the caller is its first member. On an error the lock is not held.
func (e *boltEngine) joinGroup() (*boltTx, *groupCommit, bool, error) {
	g := &e.group
	g.waiting.Add(1)
	g.mu.Lock()
	g.waiting.Add(-1)
	begins := g.tx == nil
	if begins {
		var tx *bolt.Tx
		err := e.writeRefusal()
		if err == nil {
			err = e.guarded(nil, func() (err error) {
				tx, err = e.db.Begin(true)
				return boltErr(err)
			})
		}
		if err != nil {
			g.mu.Unlock()
			return nil, nil, false, fmt.Errorf("failed to start transaction: %w", err)
		}
		g.tx = tx
	}
	// A member's boltTx comes with room for the commit of a group it
	// begins: one allocation less.
	member := &groupMemberTx{}
	bt, err := e.initBoltTx(&member.boltTx, g.tx)
	if err != nil {
		// The lookup met damage and rolled the shared transaction back
		// (see newBoltTx): the whole group ends with it.
		g.tx = nil
		if gc := g.commit; gc != nil {
			gc.err = err
			gc.done.Done()
			g.commit = nil
		}
		g.mu.Unlock()
		return nil, nil, false, fmt.Errorf("failed to start transaction: %w", err)
	}
	if begins {
		g.commit = &member.began
		g.commit.done.Add(1)
	}
	gc := g.commit
	// Until a callback succeeds the transaction holds nobody's writes, so a
	// failure drops it whole and needs no undo log.
	first := gc.members == 0
	if !first {
		bt.undo = &undoLog{}
	}
	return bt, gc, first, nil
}

// finishMember runs m as a member of the group joined (joinGroup) and
// returns when the group's commit is over.
func (e *boltEngine) finishMember(m groupMember, bt *boltTx, gc *groupCommit, first bool) error {
	g := &e.group
	err := g.runMember(m, bt, gc, first)
	// A failed callback waits too: it may have seen the group's earlier
	// writes, which are not to be observed before they are durable.
	gc.done.Wait()
	if err != nil {
		var p *callbackPanic
		if errors.As(err, &p) {
			panic(p.value)
		}
		return err
	}
	if gc.err != nil {
		return fmt.Errorf("commit failed: %w", gc.err)
	}
	return nil
}

// runMember runs m on the shared transaction, with mu held, then settles
// the member's share and releases mu. The settling is deferred so that it
// happens however m ends: a panic is recovered (runGuarded), and a
// runtime.Goexit (t.FailNow, testify's require), which recover does not
// see, is treated as a failure, after which the Goexit goes on. Either way
// the group's lock is given back: a member must never stall the others.
func (g *boltGroup) runMember(m groupMember, bt *boltTx, gc *groupCommit, first bool) (err error) {
	returned := false
	defer func() {
		g.settle(gc, bt, first, returned && err == nil)
		if !returned {
			// The goroutine is exiting: wait for the group, as a failed
			// member returning would.
			gc.done.Wait()
		}
	}()
	err = runGuarded(m, bt)
	returned = true
	return err
}

// settle counts a successful member's share, or undoes a failed one's
// writes (dropping the transaction when nobody's writes are in it yet),
// then commits for the group if nobody else is waiting to join it (or the
// group is full). Called with mu held; mu is released when it returns.
//
// A panic of bbolt recovered during a member's share (bt.broken) leaves the
// shared transaction in an unknown state: the group is abandoned, nobody's
// share is committed, and the store refuses later writes (markDamaged). A
// member whose callback ignored the error returned to it still gets it.
func (g *boltGroup) settle(gc *groupCommit, bt *boltTx, first, ok bool) {
	switch {
	case bt.broken != nil:
		g.abandon(bt, fmt.Errorf("group commit aborted: %w", bt.broken))
	case ok:
		gc.members++
		if p := bt.eng.par; p != nil {
			p.logWrites(bt.ws)
			bt.ws = nil
		}
	case first:
		g.abandon(bt, nil)
	default:
		uerr := bt.eng.guarded(bt, bt.undo.revert)
		if uerr != nil {
			// The shared transaction is in an unknown state: nobody's
			// share may be committed.
			g.abandon(bt, fmt.Errorf("group commit aborted: undo failed: %w", uerr))
		}
	}

	if g.tx != nil && g.waiting.Load() == 0 && gc.members < maxGroupSize && g.inFlight.Load() > int32(gc.members) {
		// Other writers are about (a lone writer never waits here): let
		// those that are runnable reach the group before it closes.
		runtime.Gosched()
	}
	if g.tx == nil || (g.waiting.Load() > 0 && gc.members < maxGroupSize) {
		g.mu.Unlock()
		return
	}
	tx := g.tx
	g.tx, g.commit = nil, nil
	g.mu.Unlock()
	if g.beforeCommit != nil {
		g.beforeCommit()
	}
	// bt stands for the shared transaction: a panic in bbolt's commit
	// marks it broken, and the store damaged.
	bt.tx = tx
	gc.err = bt.commitOrRollback(gc.members > 0)
	if gc.members > 0 {
		g.commits.Add(1)
		g.shares.Add(int64(gc.members))
	}
	gc.done.Done()
}

// abandon rolls back the open transaction (bt's) and ends its group with
// err. Called with mu held.
func (g *boltGroup) abandon(bt *boltTx, err error) {
	_ = bt.rollback()
	g.commit.err = err
	g.commit.done.Done()
	g.tx, g.commit = nil, nil
}

// callbackPanic carries a callback's panic past the group bookkeeping, to
// be raised again on the caller's goroutine.
type callbackPanic struct{ value any }

func (p *callbackPanic) Error() string { return fmt.Sprintf("callback panicked: %v", p.value) }

// runGuarded runs m, turning a panic into an error so that the panicking
// caller's writes are undone and the shared transaction stays usable.
func runGuarded(m groupMember, bt engineTx) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &callbackPanic{p}
		}
	}()
	return m.run(bt)
}

// undoLog records, before each write of one caller, how to put things back.
// Its methods are no-ops on a nil log (an ordinary transaction, which
// bbolt's rollback reverts).
type undoLog struct {
	steps []undoStep
	// first holds the first steps, so that a member's usual share (a
	// create or a commit) allocates no more.
	first [4]undoStep
}

// undoStep is one recorded step. Steps are values rather than closures,
// which would each be an allocation.
type undoStep struct {
	op     undoOp
	bucket *bolt.Bucket
	key    []byte
	value  []byte       // undoPut: the previous value
	seq    uint64       // undoSequence
	saved  *savedBucket // undoBucket: the previous bucket, nil for none
	fn     func() error // undoFunc
}

type undoOp uint8

const (
	undoFunc      undoOp = iota // run fn
	undoDelete                  // delete key from bucket
	undoPut                     // put value at key in bucket
	undoBucket                  // replace the sub-bucket key of bucket by saved (or by none)
	undoSequence                // set bucket's sequence to seq
	undoNewBucket               // delete the sub-bucket key of bucket
)

func (u *undoLog) add(step undoStep) {
	if u.steps == nil {
		u.steps = u.first[:0]
	}
	u.steps = append(u.steps, step)
}

// revert applies the recorded steps, last first.
func (u *undoLog) revert() error {
	for i := len(u.steps) - 1; i >= 0; i-- {
		if err := u.steps[i].apply(); err != nil {
			return err
		}
	}
	u.steps = nil
	return nil
}

func (s *undoStep) apply() error {
	switch s.op {
	case undoDelete:
		return s.bucket.Delete(s.key)
	case undoPut:
		return s.bucket.Put(s.key, s.value)
	case undoSequence:
		return s.bucket.SetSequence(s.seq)
	case undoNewBucket:
		return s.bucket.DeleteBucket(s.key)
	case undoBucket:
		if s.bucket.Bucket(s.key) != nil {
			if err := s.bucket.DeleteBucket(s.key); err != nil {
				return err
			}
		}
		if s.saved == nil {
			return nil
		}
		return s.saved.restore(s.bucket, s.key)
	}
	return s.fn()
}

// bucketsCreated remembers which layout buckets do not exist yet.
func (u *undoLog) bucketsCreated(b *boltTx) {
	if u == nil {
		return
	}
	tx := b.tx
	if tx.Bucket(bKeyVersion) == nil {
		u.add(undoStep{fn: func() error {
			b.version, b.snaps, b.parents = nil, nil, nil
			return tx.DeleteBucket(bKeyVersion)
		}})
		return
	}
	v := tx.Bucket(bKeyVersion)
	for _, name := range []string{KeySnapshots, KeyParents} {
		if v.Bucket([]byte(name)) == nil {
			u.add(undoStep{fn: func() error {
				b.snaps, b.parents = nil, nil
				return v.DeleteBucket([]byte(name))
			}})
		}
	}
}

// bucketCreated remembers that the sub-bucket key of parent was just
// created. key must not change afterwards.
func (u *undoLog) bucketCreated(parent *bolt.Bucket, key []byte) {
	if u != nil {
		u.add(undoStep{op: undoNewBucket, bucket: parent, key: key})
	}
}

// bucketChanged remembers the sub-bucket key of parent (a snapshot), sb,
// or its absence (sb nil). key must not change afterwards.
func (u *undoLog) bucketChanged(parent *bolt.Bucket, key []byte, sb *bolt.Bucket) {
	if u != nil {
		u.add(undoStep{op: undoBucket, bucket: parent, key: key, saved: saveBucket(sb)})
	}
}

// keyChanged remembers the value of key in the bucket of cur (which it
// moves), or its absence. key must not change afterwards.
func (u *undoLog) keyChanged(cur *bolt.Cursor, key []byte) {
	if u == nil {
		return
	}
	b := cur.Bucket()
	if k, prev := cur.Seek(key); bytes.Equal(k, key) && prev != nil {
		u.add(undoStep{op: undoPut, bucket: b, key: key, value: bytes.Clone(prev)})
		return
	}
	u.add(undoStep{op: undoDelete, bucket: b, key: key})
}

// sequenceChanged remembers a bucket's sequence, so an undone create gives
// its ID back and IDs stay dense, exactly as after a rollback.
func (u *undoLog) sequenceChanged(b *bolt.Bucket) {
	if u != nil {
		u.add(undoStep{op: undoSequence, bucket: b, seq: b.Sequence()})
	}
}

// savedBucket is a deep copy of a bucket.
type savedBucket struct {
	seq uint64
	// data holds the keys and values back to back, which ends delimits:
	// key i ends at ends[2i], its value at ends[2i+1]. One buffer costs
	// fewer allocations than a copy of each.
	data []byte
	ends []int
	subs []savedSub
}

type savedSub struct {
	name   []byte
	bucket *savedBucket
}

func saveBucket(b *bolt.Bucket) *savedBucket {
	if b == nil {
		return nil
	}
	// A first pass sizes the buffers: a record is a few small keys.
	size, n := 0, 0
	_ = b.ForEach(func(k, v []byte) error {
		size, n = size+len(k)+len(v), n+1
		return nil
	})
	s := &savedBucket{seq: b.Sequence(), data: make([]byte, 0, size), ends: make([]int, 0, 2*n)}
	_ = b.ForEach(func(k, v []byte) error {
		if v == nil {
			s.subs = append(s.subs, savedSub{bytes.Clone(k), saveBucket(b.Bucket(k))})
			return nil
		}
		s.data = append(s.data, k...)
		s.ends = append(s.ends, len(s.data))
		s.data = append(s.data, v...)
		s.ends = append(s.ends, len(s.data))
		return nil
	})
	return s
}

func (s *savedBucket) restore(parent *bolt.Bucket, name []byte) error {
	b, err := parent.CreateBucket(name)
	if err != nil {
		return err
	}
	if err := b.SetSequence(s.seq); err != nil {
		return err
	}
	from := 0
	for i := 0; i < len(s.ends); i += 2 {
		k, v := s.data[from:s.ends[i]], s.data[s.ends[i]:s.ends[i+1]]
		if err := b.Put(k, v); err != nil {
			return err
		}
		from = s.ends[i+1]
	}
	for _, sub := range s.subs {
		if err := sub.bucket.restore(b, sub.name); err != nil {
			return err
		}
	}
	return nil
}
